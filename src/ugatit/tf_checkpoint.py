"""Read TensorFlow V2 checkpoint bundles (``PREFIX.index`` + ``PREFIX.data-*``) without TensorFlow or protobuf.

The official U-GAT-IT weights are TF Saver V2 bundles. Installing TensorFlow only to read them is heavy and
version-fragile, so this module decodes the two simple formats involved by hand: the ``.index`` file is a
LevelDB-format SSTable mapping tensor names to ``BundleEntryProto`` messages (dtype, shape, shard, offset, size,
masked crc32c), and each ``.data-SSSSS-of-NNNNN`` shard holds the raw little-endian tensor bytes.
"""

from __future__ import annotations

import math
import re
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["TFCheckpoint", "TFCheckpointError", "crc32c", "resolve_prefix"]

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_AUTO_VERIFY_BYTES = 64 << 20
# TF DataType enum -> (numpy storage dtype, torch dtype). bfloat16 has no numpy dtype: stored as uint16 bits.
_DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    1: (np.dtype("<f4"), torch.float32),
    2: (np.dtype("<f8"), torch.float64),
    3: (np.dtype("<i4"), torch.int32),
    4: (np.dtype("u1"), torch.uint8),
    5: (np.dtype("<i2"), torch.int16),
    6: (np.dtype("i1"), torch.int8),
    9: (np.dtype("<i8"), torch.int64),
    10: (np.dtype("?"), torch.bool),
    14: (np.dtype("<u2"), torch.bfloat16),
    19: (np.dtype("<f2"), torch.float16),
}


class TFCheckpointError(ValueError):
    """A checkpoint problem, as one line naming the file (and tensor) and what to do about it."""


# ---------------------------------------------------------------- crc32c (Castagnoli), as TF and LevelDB use it
_POLY = 0x82F63B78


def _make_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _make_table()
_TABLE_LIST = _TABLE.tolist()


def _crc_loop(data: bytes | np.ndarray, crc: int = 0xFFFFFFFF) -> int:
    """Byte-at-a-time crc register update; fine for small inputs."""
    table = _TABLE_LIST
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@lru_cache(maxsize=64)
def _zeros_tables(nbytes: int) -> tuple[list[int], ...]:
    """Byte tables of the linear map 'feed nbytes zero bytes into the crc register' (nbytes a power of two)."""
    mat = [_POLY] + [1 << i for i in range(31)]  # one zero bit
    for _ in range(3 + nbytes.bit_length() - 1):  # 8 bits, then doublings up to nbytes
        mat = [_gf2_times(mat, col) for col in mat]
    return tuple([_gf2_times(mat, b << (8 * j)) for b in range(256)] for j in range(4))


def _crc_numpy(buf: np.ndarray) -> int:
    """crc32c of a uint8 array with numpy: many lanes advance in lock-step, then the lane crcs are chained.

    XOR-ing the first 4 bytes with 0xFF equals starting from 0xFFFFFFFF, so every lane starts from 0 and leading
    zero padding (which leaves a zero register unchanged) aligns the data to whole lanes.
    """
    n = buf.size
    steps = 1 << ((n.bit_length() + 1) // 2)  # about sqrt(n) bytes per lane
    lanes = -(-n // steps)
    padded = np.zeros(lanes * steps, np.uint8)
    pad = padded.size - n
    padded[pad:] = buf
    padded[pad : pad + 4] ^= 0xFF
    cols = np.ascontiguousarray(padded.reshape(lanes, steps).T)
    crc = np.zeros(lanes, np.uint32)
    for col in cols:
        crc = _TABLE[(crc ^ col) & 0xFF] ^ (crc >> 8)
    t0, t1, t2, t3 = _zeros_tables(steps)
    s = 0
    for r in crc.tolist():
        s = t0[s & 0xFF] ^ t1[(s >> 8) & 0xFF] ^ t2[(s >> 16) & 0xFF] ^ t3[s >> 24] ^ r
    return s ^ 0xFFFFFFFF


def crc32c(data: bytes | np.ndarray) -> int:
    """crc32c of bytes or a uint8 array; uses `google_crc32c` or `crc32c` when installed (faster), else numpy."""
    try:
        import google_crc32c

        return google_crc32c.value(bytes(data))
    except ImportError:
        pass
    try:
        import crc32c as _crc32c_pkg

        return _crc32c_pkg.crc32c(bytes(data))
    except ImportError:
        pass
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data, np.uint8)
    return _crc_loop(buf.tobytes()) ^ 0xFFFFFFFF if buf.size < 4096 else _crc_numpy(buf.reshape(-1))


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------- wire formats
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IndexError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode protobuf wire format into (field number, value): ints for varint/fixed, bytes for length-delimited."""
    fields, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise IndexError("truncated message")
        fields.append((tag >> 3, value))
    return fields


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def resolve_prefix(path: str | Path) -> Path:
    """Turn a checkpoint directory (read through its `checkpoint` file) or a prefix (with or without `.index`) into
    the bundle prefix, so callers can pass whatever the user has: the official code saves a directory."""
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        if not state.is_file():
            raise TFCheckpointError(f"{state}: missing; pass the bundle prefix instead (e.g. {p}/UGATIT.model-N)")
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.M)
        if not match:
            raise TFCheckpointError(f"{state}: no model_checkpoint_path line; pass the bundle prefix instead")
        prefix = p / match.group(1)  # an absolute path replaces p
        if not Path(f"{prefix}.index").is_file() and Path(f"{p / prefix.name}.index").is_file():
            prefix = p / prefix.name  # directory moved since TF wrote an absolute path
    else:
        prefix = Path(re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", str(p)))
    if not Path(f"{prefix}.index").is_file():
        raise TFCheckpointError(f"{prefix}.index: not found; pass a checkpoint directory or a PREFIX of PREFIX.index")
    return prefix


class TFCheckpoint:
    """A TF V2 bundle opened for random access: the small index is parsed at once, tensors are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.prefix = resolve_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        self._buf = self.index_path.read_bytes()
        self._entries: dict[str, dict] = {}
        num_shards = 1
        try:
            for key, value in self._table_items():
                if key == b"":
                    header = dict(_proto_fields(value))
                    num_shards = int(header.get(1, 1))
                    if header.get(2, 0) != 0:
                        self._fail("big-endian bundle; re-save it on a little-endian machine")
                else:
                    self._entries[key.decode("utf-8")] = self._parse_entry(value)
        except (IndexError, ValueError, struct.error) as exc:
            if isinstance(exc, TFCheckpointError):
                raise
            self._fail(f"corrupt index ({exc}); re-download or re-save the checkpoint")
        self.num_shards = num_shards
        self.names: list[str] = sorted(self._entries)

    def _fail(self, what: str, name: str | None = None, path: Path | None = None) -> None:
        where = f"{path or self.index_path}" + (f": tensor {name}" if name is not None else "")
        raise TFCheckpointError(f"{where}: {what}")

    # -- SSTable
    def _block(self, handle: bytes) -> bytes:
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        end = offset + size
        if end + 5 > len(self._buf) - _FOOTER:
            self._fail(f"block [{offset}, {end}) runs past the file; the index is truncated or corrupt")
        block = self._buf[offset:end]
        kind = self._buf[end]
        if kind == 1:
            self._fail("snappy-compressed block; TF never writes these, re-save the checkpoint with TensorFlow")
        if kind != 0:
            self._fail(f"unknown block compression {kind}; not a TF bundle index")
        (stored,) = struct.unpack_from("<I", self._buf, end + 1)
        if _unmask(stored) != crc32c(self._buf[offset : end + 1]):
            self._fail(f"crc mismatch in block at {offset}; the index is corrupt, re-download it")
        return block

    @staticmethod
    def _block_items(block: bytes) -> list[tuple[bytes, bytes]]:
        (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
        limit = len(block) - 4 - 4 * restarts
        if limit < 0:
            raise ValueError("bad restart count")
        items, pos, key = [], 0, b""
        while pos < limit:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            vlen, pos = _varint(block, pos)
            if shared > len(key) or pos + unshared + vlen > limit:
                raise ValueError("bad block entry")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            items.append((key, block[pos : pos + vlen]))
            pos += vlen
        return items

    def _table_items(self) -> list[tuple[bytes, bytes]]:
        if len(self._buf) < _FOOTER or struct.unpack_from("<Q", self._buf, len(self._buf) - 8)[0] != _MAGIC:
            self._fail("not a TensorFlow checkpoint index (too short or bad magic); pass PREFIX.index of a bundle")
        footer = self._buf[-_FOOTER:]
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
        items = []
        for _, handle in self._block_items(self._block(footer[pos:])):
            items += self._block_items(self._block(handle))
        return items

    def _parse_entry(self, value: bytes) -> dict:
        entry = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "crc": None, "sliced": False}
        for field, v in _proto_fields(value):
            if field == 1:
                entry["dtype"] = v
            elif field == 2:
                dims = [dict(_proto_fields(d)).get(1, 0) for f, d in _proto_fields(v) if f == 2]
                entry["shape"] = tuple(_signed64(d) for d in dims)
            elif field in (3, 4, 5):
                entry[{3: "shard", 4: "offset", 5: "size"}[field]] = _signed64(v)
            elif field == 6:
                entry["crc"] = v
            elif field == 7:
                entry["sliced"] = True
        return entry

    # -- public API
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            self._fail(f"no variable {name}; check the name against .names (TF scopes, e.g. generator_B/...)")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the index alone."""
        return self._entry(name)["shape"]

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype the bytes are stored as (bfloat16: uint16 bits; `read` returns torch.bfloat16)."""
        return self._types(name)[0]

    def _types(self, name: str) -> tuple[np.dtype, torch.dtype]:
        code = self._entry(name)["dtype"]
        if code not in _DTYPES:
            self._fail(f"unsupported dtype enum {code}; only numeric tensors can be read", name)
        return _DTYPES[code]

    def mapped(self, name: str, verify: bool | str = "auto", rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor as a read-only numpy array mapped from its byte range of the data file (the release's is
        7.5 GB), in its storage dtype (bfloat16: uint16 bits), or only its rows [start, stop) along the first axis,
        so that a large tensor can be copied a slab at a time without mapping all of it at once.

        verify: True checks the stored crc32c, False skips it, "auto" checks tensors under 64 MiB (the pure numpy
        crc is the slow part for huge tensors unless `google_crc32c`/`crc32c` is installed). A slab of rows is not
        checked: the checksum covers the whole tensor."""
        entry = self._entry(name)
        np_dtype, _ = self._types(name)
        if entry["sliced"]:
            self._fail("partitioned (sliced) variable; re-save it unpartitioned", name)
        shard, offset, size, shape = entry["shard"], entry["offset"], entry["size"], entry["shape"]
        data = Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")
        if any(d < 0 for d in shape) or size != math.prod(shape) * np_dtype.itemsize:
            self._fail(f"size {size} bytes does not match shape {list(shape)} of {np_dtype}; index is corrupt", name)
        if not data.is_file():
            self._fail("data shard missing; copy every PREFIX.data-* file next to the .index", name, data)
        file_size = data.stat().st_size
        if offset < 0 or offset + size > file_size:
            self._fail(f"bytes [{offset}, {offset + size}) past the end ({file_size}); file truncated?", name, data)
        if rows is not None:
            row_bytes = size // shape[0] if shape and shape[0] else 0
            offset, size, shape = (
                offset + rows[0] * row_bytes,
                (rows[1] - rows[0]) * row_bytes,
                (rows[1] - rows[0], *shape[1:]),
            )
        if size == 0:
            return np.empty(shape, dtype=np_dtype)
        raw = np.memmap(data, dtype=np.uint8, mode="r", offset=offset, shape=(size,))
        if rows is None and (verify is True or (verify == "auto" and size <= _AUTO_VERIFY_BYTES)):
            if entry["crc"] is not None and _unmask(entry["crc"]) != crc32c(raw):
                self._fail("crc32c mismatch; the data file is corrupt, re-download it", name, data)
        return raw.view(np_dtype).reshape(shape)

    def read(self, name: str, verify: bool | str = "auto") -> torch.Tensor:
        """One tensor, copied into memory (`mapped` says what is checked)."""
        array = np.array(self.mapped(name, verify))  # copy: detaches from the file
        if self._types(name)[1] == torch.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
