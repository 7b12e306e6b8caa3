"""glibc's heap during scoring: keep what a pass allocates, give it back after.

Every engine pass allocates tensors of shapes that change with the rows still running (up to
25 MB for a micro-batch's attention scores). With glibc's defaults, freeing them trims the
heap or unmaps the block, and the next pass takes a page fault for every 4 KiB it touches
again: 0.2-1.2 million minor faults (0.5-3 s of system time) in a 6-20 s pass on the R8
test split whenever the speed changed. ``steady_heap`` stops that for a stretch of work;
``release_freed_memory`` gives the freed pages back afterwards. Elsewhere than glibc (macOS,
musl) both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # blocks this big or bigger are mapped on their own (glibc's dynamic maximum)
DEFAULT_TRIM_THRESHOLD = 128 * 2**10  # glibc's default
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. Every call's tensors have other shapes, and
    without this a scoring replica's memory grows with the rows it has scored (measured: 478
    -> 1,139 MB over 8 calls of 1,024 rows, flat at 574 MB with it)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def steady_heap():
    """Inside: blocks under 32 MiB come from the heap and freed ones stay in it, so the pages
    a pass touched are there for the next (no page faults after the first pass). On exit:
    glibc's default trim threshold again and the freed pages handed back. The mmap threshold
    stays fixed at 32 MiB, where glibc's own dynamic threshold ends up after the first big
    frees.

    Used around the evaluation's timed passes. Not around a scoring replica's calls: there it
    raised a replica's peak from 719-773 MB to 1,069-1,170 MB (4 calls of 1,024 rows, one
    thread) for 8% less time, and the replicas keep their own settings
    (``pipeline.scoring.cpu_replica_env``)."""
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _LIBC.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    try:
        yield
    finally:
        _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        release_freed_memory()
