"""Keep freed memory in the process for reuse, so that XLA:CPU's buffers skip page faults.

XLA:CPU allocates each execution's buffers afresh. glibc's ``malloc`` serves a large block
with a new ``mmap`` and gives it back on ``free``, so every run of a program touches fresh
pages and takes a page fault (with the kernel zeroing the page) per 4 KiB of every large
temporary: on CNN-B's CROWN (patch rows of tens of MB per pass) about 15 % of the run time.
Raising glibc's mmap and trim thresholds keeps those blocks in the heap after ``free``, and
the next run reuses pages already mapped. The price: the process keeps its peak memory
instead of returning it to the system. Process-wide, so opt-in: the command line, the
quickstart and the benchmarks call it; call it yourself in a long CPU verification or training job.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
# Blocks up to this size come from the heap and stay there: 1 GiB, or 32 MiB (glibc's own
# ceiling for its adaptive threshold) where a glibc refuses so large a value.
_THRESHOLDS = (2**30, 2**25)


def reuse_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed blocks (up to 1 GiB) for reuse instead of
    unmapping them. True when applied; False where the C library is not glibc or refuses
    (nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for threshold in _THRESHOLDS:
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold):  # and never give the heap's top back
            return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return False
