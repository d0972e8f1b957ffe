"""The update D_t = W_t - W0 of a group, formed in float64 a block at a time and never whole.

Both suites need of an update only its Gram matrix, its products with thin matrices and a few counts (the
spectrum and top-K subspaces, SPEC 1, 4-7). Taken a block of the long side at a time from the two stored
matrices, its memory is those two, one r x r Gram matrix and a block, whatever the matrices' size (a
12288 x 4096 float64 update alone is 400 MB). Summing the blocks' Gram matrices changes the order of the
additions, nothing else: the result agrees with the dense path to rounding (tests/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import NamedTuple

import numpy as np
import torch

from geometry import metrics as M
from geometry import plan
from geometry.buffers import spare
from geometry.concentration import Tally
from geometry.kernels import add_gram, long_band, long_rows, mm, row_bands, symmetric


class Pass(NamedTuple):
    """What one pass over the update's blocks gathers, per matrix (L,)."""

    gram: torch.Tensor  # (L, r, r) D^T D (m >= n) or D D^T
    changed: torch.Tensor | None  # entries whose bf16 bit pattern changed (SPEC 1); None: not counted
    small: torch.Tensor | None  # entries with |D| <= tol (the absolute variant of SPEC 1)
    within: tuple[torch.Tensor, ...]  # changed entries inside each mask given (SPEC 5)
    projected: torch.Tensor | None  # (L, k, r) X^T times the long side, X the long-side basis given (SPEC 4)


class LongMask:
    """A mask (L, m, n) bool held as the blocks read it: as rows of the long side (``BlockedUpdate``), on the CPU
    plan packed 8 entries to a byte, an eighth of a bool tensor's memory (a 12288 x 4096 mask: 6 MB against 50);
    on the GPU plan as it is."""

    def __init__(self, mask: torch.Tensor):
        long = long_rows(mask)  # as BlockedUpdate lays the update out
        self.cols = long.shape[-1]
        self._plain = long if plan.gpu(long) else None
        self._packed = None if self._plain is not None else torch.from_numpy(
            np.packbits(long.numpy(), axis=-1, bitorder="little"))

    def band(self, rows: slice) -> torch.Tensor:
        """(L, b, r) bool: the mask's long-side rows ``rows``."""
        if self._plain is not None:
            return self._plain[:, rows]
        bits = np.unpackbits(self._packed[:, rows].numpy(), axis=-1, count=self.cols, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))


class BlockedUpdate:
    """D = Wt - W0 for stored (L, m, n) tensors, visited as blocks of the long side in float64.

    ``long(X)`` is the product of the long side with thin X: D X (m >= n, X (L, n, k)) or D^T X, as the
    smaller side's Gram matrix needs. Used in a ``with`` block: its blocks, products and the Gram matrix a pass
    gathers are formed in buffers lent for that block (``geometry.buffers.spare``), and are not to be used
    after it."""

    def __init__(self, W0, Wt):
        """W0, Wt: (L, m, n) tensors, or matrices left in their files (offline.stored), read a band at a time."""
        self.m, self.n = W0.shape[-2:]
        self.tall = self.m >= self.n
        self.W0, self.Wt = W0, Wt  # their long side as rows (kernels.long_band): D itself when tall, else D^T
        self.L, self.rows, self.cols = W0.shape[0], max(self.m, self.n), min(self.m, self.n)
        self.device = W0.device
        self.bands = row_bands(self.rows, 8 * self.cols * max(1, self.L))
        self._whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._lent = ExitStack()
        self._gram = self._lent.enter_context(spare())  # first: the one this thread keeps (geometry.buffers)
        self._scratch, self._scratch0 = (self._lent.enter_context(spare()) for _ in range(2))  # D's block, W0's

    def __enter__(self) -> BlockedUpdate:
        return self

    def __exit__(self, *exc) -> None:
        self._whole = None
        self._lent.close()

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, W0 block, W_t block as stored, D block in float64 (L, b, r)), each D block valid until the next
        (``buffers.Scratch``). An update that is one block is formed once and kept (it is within the block
        budget)."""
        if self._whole is not None:
            yield slice(0, self.rows), *self._whole
            return
        for rows in self.bands:
            w0, wt = long_band(self.W0, rows), long_band(self.Wt, rows)
            d = self._scratch.widen(wt)  # a copy even when W_t is float64 already: d is written next
            d -= self._scratch0.widen(w0)  # both float64: torch widens a mixed operand into a new temporary
            if rows.stop - rows.start == self.rows:
                self._whole = w0, wt, d
            yield rows, w0, wt, d

    def gather(self, abs_tol: float | None = None, masks: tuple[LongMask, ...] = (),
               basis: torch.Tensor | None = None, tally: Tally | None = None) -> Pass:
        """The Gram matrix, and in the same pass: with ``abs_tol``, the bf16 changes, the small entries and the
        changes inside each of ``masks``; with ``basis`` (L, long side, k), its product with the long side (what
        ``overlap`` needs besides the Gram matrix); with ``tally``, the entry metrics of SPEC 11 (fed every
        block). The Gram matrix is valid until the next pass."""
        L, r = self.L, self.cols
        gram = self._gram.take((L, r, r), device=self.device).zero_()
        counted = abs_tol is not None
        changed, small = (torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)) if counted \
            else (None, None)
        within = tuple(torch.zeros(L, dtype=torch.float64) for _ in masks) if counted else ()
        projected = None
        if basis is not None:
            projected = torch.zeros(L, basis.shape[-1], r, dtype=torch.float64, device=basis.device)
        with spare() as product:  # a band's product with the basis (L, k, r), for this pass only
            for rows, w0, wt, d in self.blocks():
                add_gram(gram, d)
                if counted:
                    moved = M.changed_mask(w0, wt)
                    changed += M.count(moved).cpu()
                    small += M.count_small(d, abs_tol).cpu()
                    for acc, mask in zip(within, masks, strict=True):
                        acc += M.count(moved & mask.band(rows)).cpu()
                if basis is not None:
                    projected += mm(basis[:, rows].mT, d, product)
                if tally is not None:
                    tally.add(d)
        return Pass(symmetric(gram), changed, small, within, projected)

    def long(self, X: torch.Tensor) -> torch.Tensor:
        """(L, rows, k): the long side times X (L, r, k), a block at a time."""
        out = torch.empty(X.shape[0], self.rows, X.shape[-1], dtype=torch.float64, device=X.device)
        with spare() as product:
            for rows, _, _, d in self.blocks():
                out[:, rows] = mm(d, X, product)
        return out

    def dense(self) -> torch.Tensor:
        """D whole, (L, m, n) float64: for the paths that decompose it whole (``--update-svd exact`` or
        ``randomized``, and the exact fallback)."""
        D = torch.empty(self.L, self.rows, self.cols, dtype=torch.float64, device=self.device)
        for rows, _, _, d in self.blocks():
            D[:, rows] = d
        return D if self.tall else D.mT


def overlap(p: Pass, short: torch.Tensor, m: int, n: int) -> M.Overlap:
    """SPEC 4 (``metrics.overlap``) from a pass given the long side's principal basis, ``short`` (L, r, k) the
    other side's: ||D||_F^2 is the Gram matrix's trace, the short side's energy ||D Y||_F^2 = tr(Y^T G Y)
    (Y = V_k of a tall D), the long side's ||X^T D||_F^2 and the two-sided ||X^T D Y||_F^2 from the product
    gathered. Agrees with the dense formula to rounding (tests/test_engine.py)."""
    k = short.shape[-1]
    total = p.gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    long = p.projected.square().sum((-2, -1))
    side = (mm(p.gram, short) * short).sum((-2, -1))
    two = mm(p.projected, short).square().sum((-2, -1)) / total
    left, right = (long, side) if m >= n else (side, long)
    return M.Overlap(two, two / (k * k / (m * n)), left / total, right / total)
