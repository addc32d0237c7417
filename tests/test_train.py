"""Training runs: exact resume, atomic checkpoints, run-directory safety, signals, bad data, export."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ugatit.checkpoint import list_checkpoints, load_checkpoint, load_model
from ugatit.cli import main
from ugatit.config import RESUMABLE, ConfigError, configs
from ugatit.data import DataError
from ugatit.synthetic import make_sample, write_dataset
from ugatit.train import read_run_configs, resolve_configs, train
from ugatit.trainer import Trainer

TINY = dict(img_size=32, ch=4, n_res=1, light=True, global_layers=4, local_layers=3, num_workers=0, log_every=1)
TINY_ARGS = "--img-size 32 --ch 4 --n-res 1 --light --global-layers 4 --local-layers 3 --num-workers 0".split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "data", size=32, n_train=8, n_test=3, seed=1)


def _weights(run_dir):
    _, states = load_model(list_checkpoints(run_dir)[-1][1])
    return states


def test_resume_is_exact(dataset, tmp_path):
    """6 steps in one go equal 3 steps, a stop, and a resume to 6: weights, u/v vectors and optimizer moments."""
    model, run = configs(**TINY, iterations=6, save_every=100, sample_every=100, batch_size=2)
    train(model, run, dataset, tmp_path / "one", progress=False)
    train(model, run, dataset, tmp_path / "two", until=3, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "two")] == [3]
    train(model, run, dataset, tmp_path / "two", progress=False)

    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for net in one:
        for key in one[net]:
            assert torch.equal(one[net][key], two[net][key]), f"{net}.{key}"
    states = []
    for folder in ("one", "two"):
        trainer = Trainer(model, run)
        load_checkpoint(trainer, list_checkpoints(tmp_path / folder)[-1][1])
        states.append(trainer.opt_G.state_dict()["state"])
    for index, moments in states[0].items():
        assert torch.equal(moments["exp_avg_sq"], states[1][index]["exp_avg_sq"])
    logged = [json.loads(line)["step"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("first", ["fast", "exact"])
def test_resuming_with_the_other_precision_keeps_each_paths_adam(dataset, tmp_path, first):
    """`--precision` may change on resume: the run goes on from the saved moments and step counts with its own path's
    Adam (torch's default one for exact, whose rounding the parity fixture was made with; the fused kernel for fast),
    not with the one that saved them, and the exact one counts its steps on the CPU."""
    second = "exact" if first == "fast" else "fast"
    model, run = configs(**TINY, iterations=2, save_every=1, sample_every=100, precision=first)
    train(model, run, dataset, tmp_path, until=1, progress=False)
    saved = torch.load(list_checkpoints(tmp_path)[-1][1] / "state.pt", weights_only=True)["opt_G"]
    resumed = dataclasses.replace(run, precision=second)
    train(model, resumed, dataset, tmp_path, progress=False)  # the resumed run itself
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]

    trainer = Trainer(model, resumed)  # what that run loaded from step 1
    load_checkpoint(trainer, list_checkpoints(tmp_path)[0][1])
    optimizer = trainer.opt_G
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {params[index] for index in saved["state"]} == optimizer.state.keys()
    for index, moments in saved["state"].items():
        state = optimizer.state[params[index]]
        assert all(torch.equal(state[key], moments[key]) for key in ("exp_avg", "exp_avg_sq"))
        assert state["step"].item() == 1.0 and state["step"].device.type == "cpu"
    if second == "exact":
        assert type(optimizer) is torch.optim.Adam
        assert not optimizer.param_groups[0]["fused"] and not optimizer.param_groups[0]["capturable"]
    else:
        assert optimizer.state_dict()["param_groups"][0]["fused"]  # the fast path's own Adam, fused


def test_a_checkpoint_keeps_the_count_of_skipped_updates(tmp_path):
    """The updates left out for non-finite gradients (the progress bar's "skipped") count on across a resume."""
    from ugatit.checkpoint import rng_state, save_checkpoint

    model, run = configs(**TINY)
    trainer = Trainer(model, run)
    trainer.skipped = {"D": 3, "G": 1}
    folder = save_checkpoint(trainer, tmp_path, {"rng": [rng_state(trainer.device)]})
    resumed = Trainer(model, run)
    load_checkpoint(resumed, folder)
    assert resumed.skipped == {"D": 3, "G": 1}


def test_resume_with_data_workers_is_exact(dataset, tmp_path):
    model, run = configs(**{**TINY, "num_workers": 2}, iterations=4, save_every=100, sample_every=100)
    train(model, run, dataset, tmp_path / "one", progress=False)
    train(model, run, dataset, tmp_path / "two", until=2, progress=False)
    train(model, run, dataset, tmp_path / "two", progress=False)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.equal(one[n][k], two[n][k]) for n in one for k in one[n])


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch):
    model, run_config = configs(**TINY, iterations=4, save_every=2, sample_every=100)
    run = tmp_path / "run"
    train(model, run_config, dataset, run, until=2, progress=False)

    def dies_halfway(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"half a checkpoint")
        else:
            f.write(b"half a checkpoint")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        train(model, run_config, dataset, run, progress=False)
    monkeypatch.undo()

    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    trainer = Trainer(model, run_config)
    load_checkpoint(trainer, list_checkpoints(run)[-1][1])
    assert trainer.step == 2
    train(model, run_config, dataset, run, progress=False)
    assert list_checkpoints(run)[-1][0] == 4


def test_keep_last_prunes_old_checkpoints(dataset, tmp_path):
    model, run = configs(**TINY, iterations=6, save_every=1, sample_every=100, keep_last=2)
    train(model, run, dataset, tmp_path, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5, 6]


def test_run_directory_of_another_run_is_never_overwritten(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(dataset), "--run-dir", str(run), *TINY_ARGS, "--iterations", "2", "--no-progress"]) == 0
    before = (list_checkpoints(run)[-1][1] / "model.safetensors").read_bytes()
    other = TINY_ARGS[:3] + ["8"] + TINY_ARGS[4:]  # --ch 8
    assert main(["train", str(dataset), "--run-dir", str(run), *other, "--iterations", "2", "--no-progress"]) == 2
    assert (list_checkpoints(run)[-1][1] / "model.safetensors").read_bytes() == before
    # Resuming with only the changeable settings given, or none, continues the stored run.
    assert main(["train", str(dataset), "--run-dir", str(run), "--iterations", "3", "--no-progress"]) == 0
    assert list_checkpoints(run)[-1][0] == 3
    assert read_run_configs(run)[0].ch == 4
    args = ["train", str(dataset), "--run-dir", str(run), *other, "--iterations", "1", "--overwrite", "--no-progress"]
    assert main(args) == 0
    assert [step for step, _ in list_checkpoints(run)] == [1]
    assert read_run_configs(run)[0].ch == 8


def test_sigterm_saves_a_checkpoint_before_exiting(dataset, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ugatit", "train", str(dataset), "--run-dir", str(run), *TINY_ARGS,
           "--iterations", "100000", "--save-every", "100000", "--sample-every", "100000", "--log-every", "1",
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "checkpoint saved" in out
    steps = [step for step, _ in list_checkpoints(run)]
    assert len(steps) == 1 and steps[0] >= 2


def _bad_dataset(root: Path):
    for split in ("trainA", "trainB"):
        (root / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 60, 100, 200)).save(root / split / f"{i}.png")
    (root / "trainA" / "broken.jpg").write_bytes(b"")
    (root / "trainB" / "notes.png").write_text("not an image")
    return root


def test_bad_images_are_refused_then_skipped_on_request(tmp_path, capsys):
    data = _bad_dataset(tmp_path / "data")
    model, run = configs(**TINY, iterations=1, sample_every=100)
    with pytest.raises(DataError, match="broken.jpg: zero-byte file") as info:
        train(model, run, data, tmp_path / "run", progress=False)
    assert "notes.png" in str(info.value)
    assert not list_checkpoints(tmp_path / "run")
    train(model, run, data, tmp_path / "run", skip_bad_images=True, progress=False)
    assert list_checkpoints(tmp_path / "run")[-1][0] == 1


def test_check_data_reports_and_exit_codes(tmp_path, capsys, dataset):
    assert main(["check-data", str(dataset)]) == 0
    assert "trainA: 8 good, 0 bad" in capsys.readouterr().out
    data = _bad_dataset(tmp_path / "bad")
    assert main(["check-data", str(data)]) == 1
    out = capsys.readouterr().out
    assert "broken.jpg: zero-byte file" in out and "notes.png: not an image" in out
    assert main(["check-data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """A run folder with checkpoints at steps 1 and 2 (not to be changed by the tests that read it)."""
    # No lr decay: with it, step 2 of 2 would run at lr 0 and leave the weights as they were.
    model, run = configs(**TINY, iterations=2, save_every=1, sample_every=100, decay=False)
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(model, run, dataset, run_dir, progress=False)
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]
    return run_dir, model


def test_export_generator_only(trained_run, tmp_path, capsys):
    run_dir, model = trained_run
    checkpoint = list_checkpoints(run_dir)[-1][1]
    out = tmp_path / "g.safetensors"
    assert main(["export", str(checkpoint), "--generator-only", "--direction", "A2B", "--out", str(out)]) == 0
    loaded_config, states = load_model(out)
    assert list(states) == ["genA2B"] and loaded_config == model
    _, full = load_model(checkpoint)
    assert all(torch.equal(states["genA2B"][k], full["genA2B"][k]) for k in states["genA2B"])
    assert out.stat().st_size < (checkpoint / "model.safetensors").stat().st_size / 2
    assert main(["export", str(checkpoint), "--generator-only", "--out", str(out)]) == 2

    # A run folder stands for its latest checkpoint, and says so.
    capsys.readouterr()
    from_run = tmp_path / "run.safetensors"
    assert main(["export", str(run_dir), "--generator-only", "--direction", "A2B", "--out", str(from_run)]) == 0
    assert f"using {run_dir}: latest checkpoint step_0000002" in capsys.readouterr().out
    _, run_states = load_model(from_run)
    assert run_states["genA2B"].keys() == states["genA2B"].keys()
    assert all(torch.equal(run_states["genA2B"][k], states["genA2B"][k]) for k in states["genA2B"])
    _, first = load_model(list_checkpoints(run_dir)[0][1], ["genA2B"])
    assert not all(torch.equal(first["genA2B"][k], states["genA2B"][k]) for k in states["genA2B"])


def test_translate_a_run_folder_with_its_latest_checkpoint(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    make_sample("A", np.random.default_rng(0), 32)[0].save(tmp_path / "in.png")
    common = [str(tmp_path / "in.png"), "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(["translate", str(run_dir), *common, "--out", str(tmp_path / "from_run")]) == 0
    assert f"using {run_dir}: latest checkpoint step_0000002" in capsys.readouterr().out
    latest = list_checkpoints(run_dir)[-1][1]
    assert main(["translate", str(latest), *common, "--out", str(tmp_path / "from_checkpoint")]) == 0
    from_run, from_checkpoint = (
        np.asarray(Image.open(tmp_path / d / "in.png")) for d in ("from_run", "from_checkpoint")
    )
    assert from_run.shape == (32, 32, 3) and np.array_equal(from_run, from_checkpoint)


def test_run_folder_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """A run before its first checkpoint is complete: config.json, and a checkpoint being written (or one whose
    writing crashed), or no checkpoints/ folder yet."""
    Image.new("RGB", (32, 32), (200, 120, 40)).save(tmp_path / "in.png")
    for name, half_written in (("writing", True), ("starting", False)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.json").write_text("{}")
        if half_written:
            (run_dir / "checkpoints" / ".step_0000001.tmp-123").mkdir(parents=True)
        out = tmp_path / f"out_{name}"
        translate = ["translate", str(run_dir), str(tmp_path / "in.png"), "--out", str(out), "--no-progress"]
        export = ["export", str(run_dir), "--generator-only", "--out", str(out)]
        for args in (translate, [*translate, "--device", "cpu"], export):
            capsys.readouterr()
            assert main(args) == 2, args
            err = capsys.readouterr().err
            assert err.startswith("ugatit: error:") and err.count("\n") == 1 and str(run_dir) in err, err
            if half_written:
                assert "no checkpoint" in err, err
            assert "Traceback" not in err and not out.exists()


def test_resuming_may_change_only_resumable_settings(dataset, tmp_path, capsys):
    assert {"iterations", "save_every", "precision"} <= RESUMABLE and not {"lr", "seed", "ch"} & RESUMABLE
    run_dir = tmp_path / "run"
    requested = {**TINY, "iterations": 1, "sample_every": 100}
    model, run = resolve_configs(run_dir, requested)  # a new run: as requested
    assert (model, run) == configs(**requested)
    train(model, run, dataset, run_dir, progress=False)

    model2, run2 = resolve_configs(run_dir, {"iterations": 2})  # the stored run, with a resumable change
    assert model2 == model and run2 == dataclasses.replace(run, iterations=2)
    train(model2, run2, dataset, run_dir, progress=False)
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]
    assert read_run_configs(run_dir) == (model, run2)

    with pytest.raises(ConfigError, match="lr"):
        resolve_configs(run_dir, {"iterations": 3, "lr": 1e-3})
    with pytest.raises(ConfigError, match="lr"):
        train(model2, dataclasses.replace(run2, iterations=3, lr=1e-3), dataset, run_dir, progress=False)
    capsys.readouterr()
    args = ["train", str(dataset), "--run-dir", str(run_dir), "--iterations", "3", "--lr", "0.001", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ugatit: error:") and err.count("\n") == 1 and "lr" in err, err
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]
    assert read_run_configs(run_dir) == (model, run2)


def test_importing_ugatit_sets_no_environment_variable():
    code = (
        "import json, os, torch; before = set(os.environ.items()); "
        "import ugatit, ugatit.cli, ugatit.train, ugatit.trainer, ugatit.fast; "
        "changed = sorted(set(os.environ.items()) ^ before); "
        "print(json.dumps([os.environ.get('THP_MEM_ALLOC_ENABLE'), changed]))"
    )
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [None, []]


def test_enable_huge_pages_sets_the_allocator_variable_unless_set(monkeypatch):
    from ugatit.tuning import enable_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    enable_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice wins
    enable_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_samples_have_the_official_layout(dataset, tmp_path):
    model, run = configs(**TINY, iterations=2, sample_every=2)
    train(model, run, dataset, tmp_path, progress=False)
    grid = Image.open(tmp_path / "samples" / "A2B_0000002.png")
    chosen = json.loads((tmp_path / "samples.json").read_text())
    assert grid.size == (32 * len(chosen["A"]), 32 * 7)
    assert len(chosen["A"]) == 8  # 5 train + 3 test images
    assert os.path.isfile(tmp_path / "samples" / "B2A_0000002.png")


@pytest.mark.parametrize("fast_dtype", ["float32", "bfloat16"])
def test_fast_training_says_what_it_computes_in(dataset, tmp_path, fast_dtype):
    model, run = configs(
        **TINY, iterations=1, save_every=100, sample_every=100, precision="fast", fast_dtype=fast_dtype
    )
    messages = []
    train(model, run, dataset, tmp_path, progress=False, echo=messages.append)
    assert f"fast path on cpu: computing in {fast_dtype}" in messages
    assert list_checkpoints(tmp_path)


def test_log_separates_waiting_for_data_from_the_step(dataset, tmp_path, monkeypatch):
    """A loader that is slow shows up as data_s, not as step_s: the log says whether data is on the critical path."""
    import ugatit.train

    def slow_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            time.sleep(0.5)
            yield batch

    real_batches = ugatit.train.infinite_batches
    monkeypatch.setattr(ugatit.train, "infinite_batches", slow_batches)
    model, run = configs(**{**TINY, "log_every": 2}, iterations=4, save_every=100, sample_every=100)
    train(model, run, dataset, tmp_path, progress=False)
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries] == [2, 4]
    for entry in entries:  # two domains, 0.5 s each, per step; means over the two steps since the last line
        assert 1.0 <= entry["data_s"] < 1.5
        assert 0 < entry["step_s"] < 1.0


def test_compile_without_a_cpu_compiler_is_refused_before_training(dataset, tmp_path, monkeypatch, capsys):
    import torch._inductor.config  # where torch.compile reads $CXX (or g++) when first imported

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    run = tmp_path / "run"
    args = ["train", str(dataset), "--run-dir", str(run), *TINY_ARGS, "--iterations", "1", "--compile"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "needs a C++ compiler" in err and "no-such-g++" in err and "Traceback" not in err
    assert not list_checkpoints(run)
