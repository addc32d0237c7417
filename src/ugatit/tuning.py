"""Platform tuning for CPU training, applied by the training entry points only (never on import).

Both are measured to pay on the project's CPUs (docs/performance.md, "The C heap" and "Huge pages"):

* `enable_huge_pages()`: large CPU tensors (the discriminators' weight gradients, the Adam temporaries) are
  allocated afresh at every step, and first touching 4 KiB pages costs more than the arithmetic on them. PyTorch's
  allocator backs allocations of 2 MiB and more with transparent huge pages when THP_MEM_ALLOC_ENABLE=1; it reads the
  variable once, at the process's first large allocation. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
* `release_free_heap()`: CPU activations under 32 MiB come from glibc's heap, which keeps freed blocks resident, and
  the free blocks are scattered, so the heap never shrinks on its own and grows step after step. The trainer hands
  the free pages back once per step; `release_heap=False` (`--no-release-heap`) turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable


def enable_huge_pages() -> None:
    """Ask PyTorch's CPU allocator for transparent huge pages, unless THP_MEM_ALLOC_ENABLE is set already."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has one (not musl, macOS or Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> bool:
    """Hand the pages of the C heap's free blocks back to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
