"""Keep glibc malloc from returning freed memory to the OS between steps.

With glibc's default thresholds, large temporaries (activations, gradients,
Gram matrices) are often served by fresh ``mmap`` pages or a trimmed heap, so
each step page-faults them in again. On this 2-core CPU that cost 10-15% of a
small CNN's step and varied from step to step, and it penalises whichever
contender allocates more. Long-running training processes usually avoid it
(a warmed heap, or jemalloc/tcmalloc), so the benchmarks fix the thresholds
for every contender alike; ``--glibc-default`` measures without.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_LIMIT = 32 << 20  # glibc's largest mmap threshold on 64-bit: smaller blocks come from the heap
_TRIM_LIMIT = 1 << 30  # and the heap is not trimmed below 1 GiB of free memory


def steady_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; False if this is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_LIMIT))
