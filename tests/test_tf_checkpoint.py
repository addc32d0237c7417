"""TF V2 bundle reader: round trips through our own minimal writer (no TensorFlow), every error path, and the real
TF fixture when the shared folder is present."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED
from tf_bundle import read_varint, write_bundle
from ugatit.tf_checkpoint import TFCheckpoint, TFCheckpointError, crc32c, resolve_prefix

OFFICIAL_TF = SHARED / "reference" / "fixtures" / "official_tf_small"


def sample() -> dict:
    rng = np.random.default_rng(0)
    return {
        "generator_B/conv/conv2d/kernel": rng.standard_normal((7, 7, 3, 4)).astype(np.float32),
        "generator_B/conv/conv2d/bias": rng.standard_normal(4).astype(np.float32),
        "generator_B/conv/conv2d/kernel/Adam": rng.standard_normal((2, 2)).astype(np.float32),  # shares a key prefix
        "generator_B/conv/conv2d/kernel/Adam_1": rng.standard_normal(3).astype(np.float32),
        "discriminator_A/global/conv_0/u": rng.standard_normal((1, 8)),
        "counter": np.array(3, dtype=np.int64),
        "ids": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 5), np.float32),
        "half_bf16": torch.randn(3, 5).to(torch.bfloat16),
    }


def _expect(exc: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("prefix_name", ["UGATIT.model-3", "UGATIT_light.model-7"])
def test_round_trip(tmp_path, prefix_name):
    tensors = sample()
    prefix = write_bundle(tmp_path / "ckpt" / prefix_name, tensors)
    assert resolve_prefix(prefix.parent) == prefix
    assert resolve_prefix(f"{prefix}.index") == prefix
    assert resolve_prefix(prefix) == prefix
    ck = TFCheckpoint(prefix.parent)
    assert ck.names == sorted(tensors) and len(ck) == len(tensors)
    assert "counter" in ck and "nope" not in ck
    for name, t in tensors.items():
        got = ck.read(name, verify=True)
        if isinstance(t, torch.Tensor):
            assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), t.view(torch.int16))
            assert ck.dtype(name) == np.uint16
        else:
            assert ck.shape(name) == t.shape and ck.dtype(name) == t.dtype
            assert got.numpy().tobytes() == t.tobytes() and tuple(got.shape) == t.shape


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8)
    crc = 0xFFFFFFFF  # plain bitwise reference
    for b in data[:5000].tobytes():
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    assert crc32c(data[:5000]) == crc ^ 0xFFFFFFFF
    assert crc32c(data) == crc32c(data.tobytes())


def test_absolute_and_moved_state_file(tmp_path):
    prefix = write_bundle(tmp_path / "a" / "UGATIT.model-5", {"x": np.ones(2, np.float32)})
    (prefix.parent / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/gone/UGATIT.model-5"\n')
    assert resolve_prefix(prefix.parent) == prefix


# ---------------------------------------------------------------- errors
def test_truncated_data(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample())
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-10])
    ck = TFCheckpoint(prefix)
    last = max(ck.names, key=lambda n: ck._entries[n]["offset"] + ck._entries[n]["size"])
    with pytest.raises(TFCheckpointError) as exc:
        ck.read(last)
    _expect(exc, data.name, last, "past the end")


def test_wrong_offset(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample(), override={"counter": {4: 10**6}})
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(prefix).read("counter")
    _expect(exc, ".data-00000-of-00001", "counter", "past the end")


def test_wrong_size(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample(), override={"ids": {5: 4}})
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(prefix).read("ids")
    _expect(exc, ".index", "ids", "does not match shape")


def test_flipped_byte_fails_crc(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample())
    ck = TFCheckpoint(prefix)
    name = "generator_B/conv/conv2d/kernel"
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[ck._entries[name]["offset"] + 17] ^= 0x01
    data.write_bytes(bytes(raw))
    for verify in (True, "auto"):
        with pytest.raises(TFCheckpointError) as exc:
            ck.read(name, verify=verify)
        _expect(exc, data.name, name, "crc32c mismatch")
    assert ck.read(name, verify=False).shape == (7, 7, 3, 4)  # unchecked read still works
    ck.read("counter", verify=True)  # other tensors unaffected


def test_missing_variable(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample())
    ck = TFCheckpoint(prefix)
    for call in (ck.read, ck.shape, ck.dtype):
        with pytest.raises(TFCheckpointError) as exc:
            call("generator_A/nope")
        _expect(exc, "UGATIT.model-1.index", "no variable generator_A/nope")


def test_unknown_dtype(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample(), override={"ids": {1: 7}})  # 7 = DT_STRING
    ck = TFCheckpoint(prefix)
    for call in (ck.read, ck.dtype):
        with pytest.raises(TFCheckpointError) as exc:
            call("ids")
        _expect(exc, ".index", "ids", "dtype enum 7")
    assert ck.read("counter").item() == 3


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, np.random.default_rng(2).bytes(5000), b"short"],
    ids=["png", "random", "short"],
)
def test_not_a_checkpoint(tmp_path, content):
    index = tmp_path / "UGATIT.model-1.index"
    index.write_bytes(content)
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(index)
    _expect(exc, str(index), "not a TensorFlow checkpoint index")


def test_missing_state_file_and_prefix(tmp_path):
    write_bundle(tmp_path / "d" / "UGATIT.model-1", sample(), state_file=False)
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(tmp_path / "d")
    _expect(exc, "checkpoint", "missing", "prefix")
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(tmp_path / "d" / "UGATIT.model-2")
    _expect(exc, "UGATIT.model-2.index", "not found")


def test_corrupt_index_block(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample())
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    raw[raw.index(b"generator_B") + 3] ^= 0x20
    index.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(prefix)
    _expect(exc, index.name, "crc mismatch")


def test_snappy_refused(tmp_path):
    prefix = write_bundle(tmp_path / "UGATIT.model-1", sample(), per_block=100)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    meta_offset, _ = read_varint(bytes(raw[-48:]), 0)  # the metaindex block follows the only data block's trailer
    raw[meta_offset - 5] = 1  # trailer type byte: 1 = snappy
    index.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError) as exc:
        TFCheckpoint(prefix)
    _expect(exc, index.name, "snappy")


# ---------------------------------------------------------------- the real TF fixture
def test_official_tf_fixture():
    if not (OFFICIAL_TF / "manifest.json").is_file():
        pytest.skip(f"TF fixture not found at {OFFICIAL_TF} (set UGATIT_SHARED to the shared/ folder)")
    manifest = json.loads((OFFICIAL_TF / "manifest.json").read_text())
    ck = TFCheckpoint(OFFICIAL_TF / manifest["checkpoint"]["dir"])
    assert ck.prefix.name == "UGATIT.model-3"
    assert len(ck.names) == 776 == len(manifest["variables"])
    assert ck.names == sorted(v["name"] for v in manifest["variables"])
    for var in manifest["variables"]:
        assert ck.shape(var["name"]) == tuple(var["shape"]) and ck.dtype(var["name"]) == np.dtype(var["dtype"])
    total = 0
    for name in ck.names:
        t = ck.read(name, verify=True)
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        total += t.numel() * 4
    assert total == manifest["checkpoint"]["files"]["UGATIT.model-3.data-00000-of-00001"]["bytes"]
    rho = ck.read("generator_B/adaptive_resblock0/res1/instance_layer_norm/rho")
    assert (rho >= 0).all() and (rho <= 1).all()
