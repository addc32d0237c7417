"""End to end: the quickstart trains on the synthetic domains with the cpu-small preset and the model learns.

A model that learned judges most translations to be in the other domain and keeps the shapes of its inputs.
Each run takes a few minutes on a 2-core CPU; both the exact and the fast path must learn. The fast path runs in
fp32 everywhere, and in bf16 where the CPU has bf16 hardware (elsewhere bf16 is emulated and this run would take
over a quarter of an hour; the bf16 step is still checked against the exact one in test_fast.py).
"""

import json

import pytest

from ugatit.config import preset
from ugatit.fast import native_bf16
from ugatit.quickstart import N_TEST, quickstart

BF16_NATIVE = pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no bf16 hardware (bf16 is emulated)")


@pytest.mark.parametrize(
    "precision, fast_dtype",
    [("exact", "auto"), ("fast", "float32"), pytest.param("fast", "bfloat16", marks=BF16_NATIVE)],
)
def test_quickstart_learns_both_directions(tmp_path, precision, fast_dtype):
    configs = preset("cpu-small", precision=precision, fast_dtype=fast_dtype)
    result = quickstart(tmp_path / "qs", configs, progress=False, echo=lambda m: None)
    scores = result["scores"]
    for direction in ("A2B", "B2A"):
        trained, untrained = scores["trained"][direction], scores["untrained"][direction]
        assert scores["input"][direction]["target_domain_rate"] == 0.0
        assert trained["target_domain_rate"] >= 0.8, (direction, trained)
        assert trained["mean_iou"] >= 0.6, (direction, trained)
        assert trained["mean_iou"] >= untrained["mean_iou"] + 0.2, (direction, trained, untrained)
    out = tmp_path / "qs"
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "| A2B: judged domain B |" in (out / "report.md").read_text()
    assert len(list((out / "translated" / "A2B").glob("*_heatmap.png"))) == N_TEST
    assert json.loads((out / "scores.json").read_text())["scores"]["trained"]["B2A"]["n"] == N_TEST


def test_quickstart_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a quickstart folder"):
        quickstart(tmp_path, preset("cpu-small"), progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
