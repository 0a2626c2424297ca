"""Keep freed CPU memory in the process (glibc), instead of returning it to the OS after every op.

Every large temporary tensor is a fresh mmap by default, so each step pays page faults for all
its activations; on small VMs that dominates the step time. Turning mmap off and raising the
trim threshold lets malloc reuse the freed heap. No effect (and no error) on other C libraries.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_BYTES = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc malloc for a training loop; returns whether it applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # No mmap at all: allocations above glibc's largest mmap threshold (32 MB: the batched
    # coalition activations, the flat gradient groups) would otherwise still get fresh pages.
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
                and mallopt(M_TOP_PAD, 64 * 1024 * 1024))
