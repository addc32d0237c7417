"""Writing files so that neither a crash nor a full disk leaves half of one: `atomic_write`, which every checkpoint,
model file, export, image and JSON record ugatit writes goes through (the training log's lines are appended).

A failed write says which file it was for. The OS's errors name the temporary file or nothing, and torch.save and
safetensors do not raise OSError at all on a full disk (torch says "unexpected pos ..."), so a failure is raised as an
OSError naming the destination when the OS gave the reason, or when the disk is full.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# A write that failed with this little space left where it was going is taken for a full disk.
FULL_DISK_BYTES = 2**20


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, flush it, and rename it into place over `path`.

    `write` makes a file, or a folder and its files. A process killed at any moment leaves either the old `path` or
    the new one, never a half-written one; a folder being replaced is renamed aside until the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(tmp)
    aside = False
    try:
        write(tmp)
        _fsync(tmp)
        if tmp.is_dir() and path.exists():
            os.rename(path, old)
            aside = True
        os.replace(tmp, path)
        aside = False
        _fsync(path.parent)
    except Exception as exc:
        if aside:  # the new folder did not take the old one's place: the old one goes back
            os.rename(old, path)
        error = _failure(path, tmp, exc)
        if error is exc:
            raise
        raise error from exc
    finally:
        _remove(tmp)
        _remove(old)
    return path


def _failure(path: Path, tmp: Path, exc: Exception) -> Exception:
    """The error to raise for a failed write of `path`: the OS's reason with `path` in it; a library's error on a
    full disk as the OS's ENOSPC; any other error as it is."""
    if isinstance(exc, OSError) and exc.strerror:
        names = (exc.filename, exc.filename2)
        named = [Path(os.fsdecode(name)) for name in names if isinstance(name, (str, bytes, os.PathLike))]
        if not named or any(name == tmp or tmp in name.parents for name in named):
            return OSError(exc.errno, exc.strerror, str(path))
        return exc
    try:
        full = shutil.disk_usage(path.parent).free < FULL_DISK_BYTES
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if full else exc


def _fsync(path: Path) -> None:
    """Flush a file, or a folder with the files in it, to disk."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                _fsync(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
