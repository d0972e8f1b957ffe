"""Per-step tracking of the top-K singular subspaces of the cumulative update D_t = W_t - W0.

SPEC "Per-step tracking": at every step, for every tracked matrix, keep ||D_t||_F, the top-K
singular values and the top-K left/right singular subspaces of D_t, estimated by a warm-started
subspace iteration (block power method with Rayleigh-Ritz; Halko et al. 2011, Alg. 4.4; Saad,
"Numerical Methods for Large Eigenvalue Problems", ch. 5). From the previous step's right basis
V (n, r), r = K + p (p oversampling columns, which speed convergence of the top K), one iteration is

    Q     = orth(D V)                (m, r)  the range of D seen through V
    Z     = D^T Q                    (n, r)  Q^T D = Z^T
    Z^T Z = Ub diag(S^2) Ub^T        (r, r)  Rayleigh-Ritz: the SVD of Z^T = Ub diag(S) (Z Ub S^-1)^T
    U = Q Ub,  V = Z Ub S^-1                 Ritz vectors; S: Ritz values, lower bounds of s_i(D)

two products with D, O(mnr), and O((m + n) r^2) more. The small factorisations are done in float64
on r x r Gram matrices (CholeskyQR for orth, Golub & Van Loan 2013, 5.2.2; eigh for Rayleigh-Ritz),
many times cheaper than Householder QR and SVD of the tall (m, r), (n, r) blocks; each is checked and,
where it loses accuracy (D numerically of rank < r, or < K), that matrix takes the Householder path
(Q, R = qr(Z); U S V^T from the SVD of R^T). All matrices of one shape go through together, batched.

Convergence test, after each iteration: the residual of the top-K Ritz triplets
    res = ||D V_K - U_K diag(S_K)||_F / (sqrt(K) s_1)      (0 for exact singular triplets)
is <= tol. It bounds how far the Ritz subspaces are from singular subspaces wherever the spectrum
has a gap after s_K (Wedin 1972: sin angle <= residual / gap); where it has none (s_K ~ s_K+1) the
top-K subspace itself is ill-determined and more iterations only swap the two directions back and
forth. The product D V_K is the first block of the next iteration's D V, so the test costs no extra
product when the iteration goes on. Unconverged after ``max_iters``: the exact SVD, flagged.

Refined steps (snapshots) and cold starts (no earlier iterations behind them) take at least two
iterations, the tighter ``REFINE_TOL`` and also require the last iteration to have moved the top-K
subspace by <= eps, 1 - Sim_K(V_K before, V_K after). (Only from the second iteration of a step on:
the first also moves with D_t itself, which says nothing about convergence.)

Accuracy: right after a fresh start, when D_t is young and its K-th singular value nearly equals
its (K+1)-th, the top-K subspace is ill-conditioned and a per-step estimate can be off by one
direction (Sim_K ~ 1 - 1/K against the exact SVD). Steps that the recorder also snapshots are
therefore refined to the tighter ``REFINE_TOL``, so that tracking and an exact offline analysis
of the same checkpoints agree (SPEC: Sim_K within 0.02, stable rank within 2%).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from geometry.subspaces import subspace_sim

# Per-step test (module docstring). Measured on tiny Llama training runs (tests/test_callbacks.py,
# benchmarks/bench_recorder.py): about one iteration per step, Sim_K >= 0.99 against the exact SVD.
DEFAULT_TOL = 1e-2
# Refined steps (snapshots) and cold starts: ~3 iterations, Sim_K >= 0.999 against the exact SVD in our runs.
DEFAULT_EPS = 1e-3
REFINE_TOL = 1e-3
REFINE_MAX_ITERS = 30
# The float64 Gram shortcuts are trusted while Q is orthonormal to ORTH_TOL and s_K / s_1 > RANK_TOL
# (the float32 Ritz vectors Z (Ub / S) were then measured orthonormal to ~1e-6 in their first K columns;
# tests/test_tracking.py checks it at the edge).
ORTH_TOL = 1e-4
RANK_TOL = 1e-5


class Estimate(NamedTuple):
    """The tracked state of one matrix at one step: what the iteration returns and what a store holds.

    Fresh from the iteration: r = K + p columns, float32 on D's device (v is the next step's warm
    start); ``top(K)`` keeps the K that are reported and stored. Read back from a store
    (geometry.capture.trackfile): K columns on the CPU, u and v upcast to float32.
    """

    u: torch.Tensor  # (m, r) left Ritz vectors, descending
    s: torch.Tensor  # (r,) Ritz values, lower bounds of the singular values of D
    v: torch.Tensor  # (n, r) right Ritz vectors
    fro: float  # ||D||_F, exact
    iters: int  # subspace iterations spent at this step
    residual: float  # ||D V_K - U_K S_K||_F / (sqrt(K) s_1) after the last iteration
    exact: bool  # True when the iteration did not converge and the exact SVD was used

    def top(self, k: int) -> Estimate:
        """The first k columns / values: what is reported (SPEC item 7's K)."""
        return self._replace(u=self.u[:, :k], s=self.s[:k], v=self.v[:, :k])


def orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of y: (..., m, r) -> (..., m, r), via Householder QR."""
    return torch.linalg.qr(y).Q


def random_basis(n: int, r: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded Gaussian start (Halko et al. 2011, Alg. 4.1), orthonormalised: (n, r) float32."""
    g = torch.Generator().manual_seed(seed)
    return orth(torch.randn(n, r, generator=g)).to(device)


def orth_gram(y: torch.Tensor) -> torch.Tensor:
    """orth for a batch (B, m, r) by CholeskyQR, Q = Y L^-T with L L^T = Y^T Y (Gram, Cholesky and the r x r
    inverse in float64, the product with Y in float32); the matrices whose Q is not orthonormal to ORTH_TOL
    (Y ill-conditioned or rank-deficient) go through Householder QR."""
    yd = y.double()
    chol, info = torch.linalg.cholesky_ex(yd.mT @ yd)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    q = y @ torch.linalg.solve_triangular(chol, eye.double(), upper=False).mT.to(y.dtype)  # r x r inverse
    bad = (info != 0) | ~((q.mT @ q - eye).abs().amax((-2, -1)) <= ORTH_TOL)  # NaN counts as bad
    if bad.any():
        q[bad] = orth(y[bad])
    return q


def rayleigh_ritz(d: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz triplets of d (B, m, n) on the left basis q (B, m, r): U (B, m, r), S (B, r), V (B, n, r), descending.

    The SVD of Q^T D = Z^T from the eigenpairs of the float64 Gram Z^T Z (module docstring); matrices
    whose top k are numerically rank-deficient (s_k <= RANK_TOL s_1) take the Householder path.
    """
    z = (q.mT @ d).mT  # (B, n, r); as Q^T D: a third faster than D^T Q on CPU (measured)
    zd = z.double()
    lam, ub = torch.linalg.eigh(zd.mT @ zd)  # ascending
    lam, ub = lam.flip(-1), ub.flip(-1)
    s = lam.clamp_min(0).sqrt()
    bad = ~(s[:, k - 1] > RANK_TOL * s[:, 0])
    ub, s = ub.to(d.dtype), s.to(d.dtype)
    v = z @ (ub / torch.where(s > 0, s, 1.0)[:, None, :])
    u = q @ ub
    if bad.any():
        p, rr = torch.linalg.qr(z[bad])
        ub_b, s[bad], vbh = torch.linalg.svd(rr.mT)
        u[bad], v[bad] = q[bad] @ ub_b, p @ vbh.mT
    return u, s, v


def ritz_residuals(dv: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """||D V_K - U_K diag(S_K)||_F / (sqrt(K) s_1) per matrix: zero exactly for singular triplets.

    dv: (B, m, K) = D V_K; u: (B, m, K); s: (B, K). Relative to s_1 so that it is scale-free.
    """
    k = s.shape[-1]
    return (dv - u * s[:, None, :]).norm(dim=(-2, -1)) / (math.sqrt(k) * s[:, 0])


def subspace_iteration(d: torch.Tensor, v0: torch.Tensor, k: int, *, tol: float = DEFAULT_TOL,
                       eps: float | None = None, min_iters: int = 1, max_iters: int = 8,
                       fro: torch.Tensor | None = None) -> list[Estimate]:
    """Top-k singular triplets of each d[i] (B, m, n) from its warm start v0[i] (B, n, r), r >= k.

    fro: the norms ||d[i]||_F (B,) if the caller has them (one pass over d fewer), else computed here.

    Each matrix stops after at least ``min_iters`` iterations once its top-k residual is <= tol and,
    if ``eps`` is given, (from the second iteration on) the last iteration moved its top-k right
    subspace by <= eps, 1 - Sim_K(V_before, V_after); after ``max_iters`` without that it gets the
    exact SVD (``exact=True``). The rest of the batch iterates on without the converged ones.
    """
    d = d.float()
    fro = (d.norm(dim=(-2, -1)) if fro is None else fro).tolist()
    b, r = d.shape[0], v0.shape[-1]
    out: list[Estimate | None] = [None] * b
    for i in range(b):
        if fro[i] == 0.0:  # no update yet (e.g. a zero learning rate): no subspace, keep the start
            u = torch.eye(d.shape[1], r, device=d.device)
            out[i] = Estimate(u, torch.zeros(r, device=d.device), v0[i], 0.0, 0, 0.0, False)
    live = [i for i in range(b) if out[i] is None]  # batch index of each row of dl, v, y
    if not live:
        return out
    dl, v = _rows(d, live, b), _rows(v0, live, b)
    y = _times(dl, v)  # (B', m, r)
    for it in range(1, max_iters + 1):
        u, s, v_new = rayleigh_ritz(dl, orth_gram(y), k)
        dvk = dl @ v_new[..., :k]  # (B', m, k): the residual test, and the first columns of the next D V
        res = ritz_residuals(dvk, u[..., :k], s[:, :k])
        ok = (res <= tol) if it >= min_iters else torch.zeros_like(res, dtype=torch.bool)
        if eps is not None and it > 1:
            ok &= 1.0 - subspace_sim(v[..., :k], v_new[..., :k]) <= eps
        v = v_new
        ok, res = ok.tolist(), res.tolist()
        for j, i in enumerate(live):
            if ok[j]:
                out[i] = Estimate(u[j], s[j], v[j], fro[i], it, res[j], False)
        keep = [j for j in range(len(live)) if not ok[j]]
        if not keep:
            return out
        if it == max_iters:
            for j in keep:
                out[live[j]] = _exact(dl[j], r, fro[live[j]], max_iters, res[j])
            return out
        y = torch.cat([dvk, _times(dl, v[..., k:])], dim=-1)  # (B', m, r)
        live = [live[j] for j in keep]
        dl, v, y = _rows(dl, keep, len(ok)), _rows(v, keep, len(ok)), _rows(y, keep, len(ok))
    return out


def _times(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """D V (B, m, r) computed as (V^T D^T)^T: ~15% faster on CPU for r ~ 24 (measured; not for r ~ 16)."""
    return (v.mT @ d.mT).mT


def _rows(x: torch.Tensor, rows: list[int], n: int) -> torch.Tensor:
    """x[rows] without a copy when rows are all n of them."""
    return x if len(rows) == n else x[rows]


def _exact(d: torch.Tensor, r: int, fro: float, iters: int, res: float) -> Estimate:
    """Fallback: the exact SVD (float64 for the accuracy the comparison needs)."""
    U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
    return Estimate(U[:, :r].float(), S[:r].float(), Vh[:r].mT.float(), fro, iters, res, True)


class SubspaceTracker:
    """Warm-started top-K subspace estimates for a set of named matrices, one update per step.

    k: reported subspace dimension (SPEC item 7, default 16); oversample: extra columns p that
    the iteration carries (faster, steadier convergence of the top k); r = min(k + p, m, n).
    The first step of each matrix starts from a seeded random basis (seed + its index).
    """

    def __init__(self, k: int = 16, oversample: int = 8, *, tol: float = DEFAULT_TOL, eps: float = DEFAULT_EPS,
                 min_iters: int = 1, max_iters: int = 8, seed: int = 0):
        if k < 1 or oversample < 0 or min_iters < 1 or max_iters < min_iters or tol <= 0 or eps <= 0:
            raise ValueError("need k >= 1, oversample >= 0, 1 <= min_iters <= max_iters, tol > 0, eps > 0")
        self.k, self.oversample, self.seed = k, oversample, seed
        self.tol, self.eps, self.min_iters, self.max_iters = tol, eps, min_iters, max_iters
        self._v: dict[str, torch.Tensor] = {}  # name -> (n, r) warm start
        self._index: dict[str, int] = {}

    def dims(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(k, r) for a matrix of this shape: both capped by its rank bound min(m, n)."""
        full = min(shape)
        return min(self.k, full), min(self.k + self.oversample, full)

    def warm_start(self, name: str, v: torch.Tensor, shape: tuple[int, int]) -> None:
        """Resume from a stored basis v (n, k'): padded with seeded random columns to r, orthonormalised."""
        _, r = self.dims(shape)
        v = v.float()[:, :r]
        if v.shape[1] < r:
            extra = random_basis(shape[1], r, self._seed(name)).to(v.device)[:, : r - v.shape[1]]
            v = torch.cat([v, extra], dim=1)
        self._v[name] = orth(v)

    def update(self, name: str, d: torch.Tensor, *, refine: bool = False) -> Estimate:
        """One step for matrix ``name`` with its current cumulative update d = W_t - W0 (m, n)."""
        return self.update_many([name], d[None], refine=refine)[0]

    def update_many(self, names: list[str], d: torch.Tensor, *, refine: bool = False,
                    fro: torch.Tensor | None = None) -> list[Estimate]:
        """One step for the same-shape matrices ``names``, their updates stacked in d (B, m, n), batched.
        fro: their norms ||d[i]||_F, if known (subspace_iteration).

        refine: the refined test (at least two iterations, REFINE_TOL and the movement test eps, up to
        REFINE_MAX_ITERS) instead of the per-step one. A matrix seen for the first time starts from a
        seeded random basis; such a cold start has no earlier iterations to build on, so its batch is refined.
        """
        k, r = self.dims(tuple(d.shape[1:]))
        starts, cold = [], False
        for name in names:
            v0 = self._v.get(name)
            if v0 is None or v0.shape != (d.shape[2], r):
                v0, cold = random_basis(d.shape[2], r, self._seed(name)), True
            starts.append(v0.to(d.device))
        strict = refine or cold
        ests = subspace_iteration(d, torch.stack(starts), k, tol=min(self.tol, REFINE_TOL) if strict else self.tol,
                                  eps=self.eps if strict else None,
                                  min_iters=max(self.min_iters, 2) if strict else self.min_iters,
                                  max_iters=max(self.max_iters, REFINE_MAX_ITERS) if strict else self.max_iters,
                                  fro=fro)
        for name, est in zip(names, ests, strict=True):
            self._v[name] = est.v
        return ests

    def _seed(self, name: str) -> int:
        return self.seed + self._index.setdefault(name, len(self._index))
