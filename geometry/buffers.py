"""Working buffers reused rather than allocated afresh: a band widened, read, scored or multiplied into one
buffer in turn (``Scratch``), and while a group of matrices is measured (``reusing``), the buffers one
computation is done with lent to the next (``spare``).

Why: a tensor above the mmap threshold (offline.analyze) is mapped afresh at every allocation and its pages
faulted in and zeroed by the kernel again, and a new tensor a block fragments the heap. Reused buffers halve
the page faults at the same peak memory and give the same bits (benchmarks/bench_analyze.py; figures in
benchmarks/README.md).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Scratch:
    """One buffer that the blocks of a matrix are widened into in turn (``widen``), or a band's bytes, product or
    score written into (``bytes``, ``take``). A new tensor per block fragments the heap: a small allocation
    between two blocks takes a piece of the freed one, and the next block extends the heap instead (measured,
    the 90M pair on one thread: the heap grew by a block, 4 MiB, at nearly every block). What it gives is valid
    until it is asked again. Its bytes serve any dtype; it grows to the largest asked and keeps that."""

    def __init__(self):
        self._buf: torch.Tensor | None = None  # uint8

    def widen(self, src: torch.Tensor) -> torch.Tensor:
        """src as float64, copied in its stored order (a transposed view's copy is the transpose of a copy)."""
        flip = src.stride(-2) < src.stride(-1)
        if flip:
            src = src.mT
        out = self.take(tuple(src.shape), torch.float64, src.device)
        out.copy_(src)
        return out.mT if flip else out

    def bytes(self, size: int) -> torch.Tensor:
        """``size`` bytes of the buffer, uint8 (a band read into it: offline.stored)."""
        return self.take((size,), torch.uint8)

    @property
    def capacity(self) -> int:
        """Bytes held."""
        return 0 if self._buf is None else self._buf.numel()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """The buffer as a contiguous tensor of ``shape``, its contents undefined."""
        device = torch.device(device)
        size = math.prod(shape) * dtype.itemsize
        if self._buf is None or self._buf.device != device or self._buf.numel() < size:
            self._buf = None  # the smaller one goes back before the larger is taken
            self._buf = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        return self._buf[:size].view(dtype).view(shape)


# the largest buffer a thread keeps: a buffer's page faults cost in proportion to its size, and the work done in
# it (a Gram matrix of side r: r^3) grows faster, while what is kept idle adds to the peak. 8 MiB keeps the 90M
# pair's Gram matrices and not an 8B-shaped layer's (128 MB), where keeping them raised the peak more than it
# saved (benchmarks/bench_analyze.py, the 8B-shaped layer)
KEEP_BYTES = 8 << 20

_lent = threading.local()  # .kept: [] or [the spare this thread keeps], within ``reusing``


@contextmanager
def reusing() -> Iterator[None]:
    """Within it, ``spare`` keeps this thread's largest buffer (up to ``KEEP_BYTES``) for its next use; on
    leaving, let go: a library call holds nothing after. The offline analysis measures each group of matrices
    within one."""
    before = getattr(_lent, "kept", None)
    _lent.kept = []
    try:
        yield
    finally:
        _lent.kept = before


@contextmanager
def spare() -> Iterator[Scratch]:
    """A ``Scratch`` for the block of a ``with``; what it held is not to be used after the block. Within
    ``reusing``, the one this thread kept, if any (its pages resident), and of the spares given back the largest
    up to ``KEEP_BYTES`` is kept: a group's Gram matrices (the base's, W_t's, the update's) are formed in one
    buffer in turn, each taken first where it is needed (``linalg.gram_svd``, ``offline.blocked``). Only one:
    a spare kept is held through the group, and the peak memory rises by what is held idle."""
    kept = getattr(_lent, "kept", None)
    scratch = kept.pop() if kept else Scratch()
    try:
        yield scratch
    finally:
        if kept is not None:
            fit = [s for s in (scratch, *kept) if s.capacity <= KEEP_BYTES]
            kept[:] = [max(fit, key=lambda s: s.capacity)] if fit else []
