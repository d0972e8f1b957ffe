"""How the analysis asks glibc to hold memory: freed blocks reused within a group, returned between groups."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 1 << 20  # blocks below it are reused from the heap; larger ones mapped afresh, returned when freed


def return_freed_memory() -> None:
    """Reuse freed blocks within a group; give them back to the OS between groups (``trim``).

    glibc would raise its mmap threshold after the first large free and carve later groups out of a heap that
    fragments, so that peak memory grows with the number of checkpoints. Blocks up to ``MMAP_THRESHOLD`` come
    from the heap and are reused from one checkpoint to the next (a smaller threshold pays a page fault per
    4 KiB of every temporary); larger ones (factors, Gram matrices, matrices as stored) are mapped afresh and
    returned when freed, so a group's freed blocks are not kept resident; the heap is trimmed after each group.
    The measuring threads (geometry.offline.threads) share one arena: glibc would give each its own heap, each
    keeping its own freed blocks. benchmarks/bench_analyze.py measures peak memory and system time.
    No-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
