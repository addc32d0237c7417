"""A minimal writer of TensorFlow V2 checkpoint bundles (no TensorFlow), for the tests and the import benchmark:
an `.index` SSTable of BundleEntryProto entries and one `.data` shard, as TF's Saver writes them."""

import struct
from pathlib import Path

import numpy as np
import torch

from ugatit.tf_checkpoint import crc32c

ENUMS = {np.dtype("<f4"): 1, np.dtype("<f8"): 2, np.dtype("<i4"): 3, np.dtype("<i8"): 9, np.dtype("?"): 10}


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint at buf[pos:]: (value, position after it)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _field(num: int, value: int | bytes, wire: int | None = None) -> bytes:
    if isinstance(value, bytes):
        return _varint(num << 3 | 2) + _varint(len(value)) + value
    if wire == 5:
        return _varint(num << 3 | 5) + struct.pack("<I", value)
    return _varint(num << 3) + _varint(value)


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _block(items: list[tuple[bytes, bytes]], restart_every: int) -> bytes:
    body, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_every == 0:
            restarts.append(len(body))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(body) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray | torch.Tensor],
    *,
    per_block: int = 3,
    override: dict[str, dict[int, int]] | None = None,
    state_file: bool = True,
) -> Path:
    """Write PREFIX.index (SSTable: data blocks with restart points, index block, empty metaindex, footer; every
    block followed by type 0 + masked crc32c) and PREFIX.data-00000-of-00001. `override` replaces entry fields."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data, entries = bytearray(), [(b"", _field(1, 1) + _field(3, _field(1, 1)))]
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):  # bfloat16: write its bits
            enum, shape, raw = 14, tuple(t.shape), t.view(torch.int16).numpy().tobytes()
        else:
            enum, shape, raw = ENUMS[t.dtype], t.shape, np.ascontiguousarray(t).tobytes()
        fields = {1: enum, 3: 0, 4: len(data), 5: len(raw), 6: _mask(crc32c(raw))}
        fields.update((override or {}).get(name, {}))
        dims = b"".join(_field(2, _field(1, d)) for d in shape)
        proto = _field(1, fields[1]) + _field(2, dims)
        proto += b"".join(_field(k, fields[k]) for k in (3, 4, 5)) + _field(6, fields[6], wire=5)
        entries.append((name.encode(), proto))
        data += raw
    out = bytearray()

    def emit(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        out.extend(block + b"\0" + struct.pack("<I", _mask(crc32c(block + b"\0"))))
        return handle

    index = []
    for i in range(0, len(entries), per_block):
        chunk = entries[i : i + per_block]
        index.append((chunk[-1][0] + b"\xff", emit(_block(chunk, restart_every=2))))
    meta_handle = emit(_block([], 16))
    index_handle = emit(_block(index, 1))
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(out) + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    if state_file:
        (prefix.parent / "checkpoint").write_text(
            f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
        )
    return prefix


def to_tf_variables(nets: dict, config) -> dict[str, np.ndarray]:
    """The TF variables (names, layouts) of `tf_models` networks: what the official TF code would have saved.
    The inverse of ugatit's import, written independently of it (kernels OIHW -> HWIO, dense weights transposed,
    full mode's first MLP rows reordered from C, H, W to H, W, C, u [n] -> [1, n])."""
    from ugatit.tf_import import TF_SCOPES, tf_name

    variables = {}
    for name, net in nets.items():
        for key, value in net.state_dict().items():
            array = value.detach().numpy()
            leaf = key.rpartition(".")[2]
            if leaf == "weight" and array.ndim == 4:
                array = array.transpose(2, 3, 1, 0)
            elif leaf == "weight" and key == "MLP.linear_0.weight" and not config.light:
                side = config.img_size // 4
                array = array.reshape(array.shape[0], -1, side, side).transpose(2, 3, 1, 0).reshape(-1, array.shape[0])
            elif leaf == "weight":
                array = array.T
            elif leaf == "u":
                array = array.reshape(1, -1)
            variables[tf_name(net, key, TF_SCOPES[name])] = np.ascontiguousarray(array, dtype=np.float32)
    return variables
