"""The update D_t = W_t - W0 of a group, formed in float64 a block at a time and never whole.

The quick suite (``AnalysisConfig.quick``) needs of the update only its Gram matrix, its products with thin
matrices and a few counts. Taken a block of the long side at a time from W0 and W_t as stored, its memory is
the two stored matrices, one r x r Gram matrix and a block, whatever the matrices' size (a 12288 x 4096
float64 update alone is 400 MB). Summing the blocks' Gram matrices changes the order of the additions,
nothing else: the result agrees with the dense path to rounding (tests/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from geometry import metrics as M
from geometry.linalg import (
    BLOCK_BYTES,
    SVD,
    SymEig,
    add_gram,
    exact_svd,
    mm,
    row_bands,
    singular_values,
    symmetric,
    top_eigvecs,
)


class Pass(NamedTuple):
    """What one pass over the update's blocks gathers, per matrix (L,)."""

    gram: torch.Tensor  # (L, r, r) D^T D (m >= n) or D D^T
    changed: torch.Tensor  # entries whose bf16 bit pattern changed (SPEC 1)
    small: torch.Tensor  # entries with |D| <= tol (the absolute variant of SPEC 1)


class BlockedUpdate:
    """D = Wt - W0 for stored (L, m, n) tensors, visited as blocks of the long side in float64.

    ``long(X)`` is the product of the long side with thin X: D X (m >= n, X (L, n, k)) or D^T X, as the
    smaller side's Gram matrix needs."""

    def __init__(self, W0: torch.Tensor, Wt: torch.Tensor):
        self.m, self.n = W0.shape[-2:]
        self.tall = self.m >= self.n
        # the long side as rows: D itself when tall, D^T (views, no copy) when wide
        self.W0, self.Wt = (W0, Wt) if self.tall else (W0.mT, Wt.mT)
        rows, cols = self.W0.shape[-2:]
        self.bands = row_bands(rows, 8 * cols * max(1, W0.shape[0]), BLOCK_BYTES)
        self.rows = rows
        self._whole: torch.Tensor | None = None

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, W0 block, W_t block as stored, D block in float64 (L, b, r)). An update that is one block is
        formed once and kept (it is within the block budget)."""
        if self._whole is not None:
            yield slice(0, self.rows), self.W0, self.Wt, self._whole
            return
        for rows in self.bands:
            w0, wt = self.W0[:, rows], self.Wt[:, rows]
            d = wt.to(torch.float64, copy=True)  # a copy even when W_t is float64 already: d is written next
            d -= w0  # in place, W0's block widened inside the kernel: no float64 copy of it
            if rows.stop - rows.start == self.rows:
                self._whole = d
            yield rows, w0, wt, d

    def gather(self, abs_tol: float) -> Pass:
        """Gram matrix, bf16 changes and small entries, in one pass."""
        L, r = self.W0.shape[0], self.W0.shape[-1]
        gram = torch.zeros(L, r, r, dtype=torch.float64, device=self.W0.device)
        changed = torch.zeros(L, dtype=torch.float64)
        small = torch.zeros(L, dtype=torch.float64)
        for _, w0, wt, d in self.blocks():
            add_gram(gram, d)
            changed += M.count(M.changed_mask(w0, wt)).cpu()
            small += M.count_small(d, abs_tol).cpu()
        return Pass(symmetric(gram), changed, small)

    def long(self, X: torch.Tensor) -> torch.Tensor:
        """(L, rows, k): the long side times X (L, r, k), a block at a time."""
        out = torch.empty(X.shape[0], self.rows, X.shape[-1], dtype=torch.float64, device=X.device)
        for rows, _, _, d in self.blocks():
            out[:, rows] = mm(d, X)
        return out

    def dense(self) -> torch.Tensor:
        """D whole, (L, m, n) float64: for the exact fallback only."""
        D = torch.cat([d for _, _, _, d in self.blocks()], dim=1)
        return D if self.tall else D.mT


def update_svd(upd: BlockedUpdate, K: int, warm: torch.Tensor | None, seed: int, gram: torch.Tensor) -> SVD:
    """The update's full spectrum and top-K subspaces from its Gram matrix (``linalg.top_eigvecs``, certified),
    the long side's vectors a block at a time; D is formed whole only when the Gram matrix cannot resolve
    the top K (the exact SVD, method "subspace->exact")."""
    try:
        eig = SymEig(gram)
        found = top_eigvecs(eig, K, warm=warm, seed=seed)
    except torch.linalg.LinAlgError:
        found = None
    if found is None:
        return exact_svd(upd.dense(), K)._replace(method="subspace->exact")
    X, method = found
    S = singular_values(eig.values, resolved_only=True)
    big = upd.long(X) / S[..., None, :K].clamp_min(torch.finfo(S.dtype).tiny)
    U, V = (big, X) if upd.tall else (X, big)
    return SVD(U, S, V, method)
