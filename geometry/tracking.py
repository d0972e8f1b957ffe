"""Per-step tracking of the top-K singular subspaces of the cumulative update D_t = W_t - W0.

SPEC "Per-step tracking": at every step, for every tracked matrix, keep ||D_t||_F, the top-K
singular values and the top-K left/right singular subspaces of D_t, estimated by a warm-started
subspace iteration (block power method with Rayleigh-Ritz; Halko et al. 2011, Alg. 4.4; Saad,
"Numerical Methods for Large Eigenvalue Problems", ch. 5). From the previous step's right basis
V (n, r), r = K + p (p oversampling columns, which speed convergence of the top K), one iteration is

    Q     = orth(D V)                (m, r)  the range of D seen through V
    P R   = qr(D^T Q)                (n, r)  thin QR of Z = D^T Q
    R^T   = Ub diag(S) Vb^T          (r, r)  Rayleigh-Ritz: Q^T D P = Z^T P = R^T
    U = Q Ub,  V = P Vb                      Ritz vectors; S: Ritz values, lower bounds of s_i(D)

two products with D, O(mnr), and factorisations of O((m + n) r^2). Because D_t moves little per
step, one iteration per step usually suffices: the warm start carries earlier steps' iterations.

Convergence test, after each iteration: the residual of the top-K Ritz triplets
    res = ||D V_K - U_K diag(S_K)||_F / (sqrt(K) s_1)      (0 for exact singular triplets)
is <= tol, and the iteration moved the top-K subspace by <= eps, 1 - Sim_K(V_K before, V_K after).
The product D V_K is the first block of the next iteration's D V, so the test costs no extra
product when the iteration goes on. Unconverged after ``max_iters``: the exact SVD, flagged.

Accuracy: right after a fresh start, when D_t is young and its K-th singular value nearly equals
its (K+1)-th, the top-K subspace is ill-conditioned and a per-step estimate can be off by one
direction (Sim_K ~ 1 - 1/K against the exact SVD). Steps that the recorder also snapshots are
therefore refined to the tighter ``REFINE_TOL``, so that tracking and an exact offline analysis
of the same checkpoints agree (SPEC: Sim_K within 0.02, stable rank within 2%).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.linalg import subspace_sim
from geometry.sources import layer_of, module_of
from geometry.store import read_manifest, read_tracking
from geometry.table import Row, Table

# Per-step test (module docstring). Measured on tiny Llama training runs (tests/test_callbacks.py):
# one iteration per step once D_t has a few steps of history, Sim_K >= 0.99 against the exact SVD.
DEFAULT_TOL = 1e-2
DEFAULT_EPS = 1e-3
# Refined steps (snapshots): ~3 more iterations, Sim_K >= 0.999 against the exact SVD in our runs.
REFINE_TOL = 1e-3
REFINE_MAX_ITERS = 30


class Estimate(NamedTuple):
    """The tracked state of one matrix at one step (all float32, on D's device).

    u: (m, r) left Ritz vectors, descending; s: (r,) Ritz values; v: (n, r) right Ritz vectors, the
    next step's warm start; only the first ``k`` columns / values are reported.
    """

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    fro: float  # ||D||_F, exact
    iters: int  # subspace iterations spent at this step
    residual: float  # ||D V_K - U_K S_K||_F / (sqrt(K) s_1) after the last iteration
    exact: bool  # True when the iteration did not converge and the exact SVD was used


def orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of y: (m, r) -> (m, r), via thin QR."""
    return torch.linalg.qr(y).Q


def random_basis(n: int, r: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded Gaussian start (Halko et al. 2011, Alg. 4.1), orthonormalised: (n, r) float32."""
    g = torch.Generator().manual_seed(seed)
    return orth(torch.randn(n, r, generator=g)).to(device)


def ritz_residual(dv: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> float:
    """||D V_K - U_K diag(S_K)||_F / (sqrt(K) s_1): zero exactly for singular triplets.

    dv: (m, K) = D V_K; u: (m, K); s: (K,). Relative to s_1 so that it is scale-free.
    """
    if s[0] <= 0:
        return 0.0
    k = s.shape[0]
    return float((dv - u * s).norm() / (math.sqrt(k) * s[0]))


def subspace_iteration(d: torch.Tensor, v0: torch.Tensor, k: int, *, tol: float = DEFAULT_TOL,
                       eps: float = DEFAULT_EPS, min_iters: int = 1, max_iters: int = 8) -> Estimate:
    """Top-k singular triplets of d (m, n) from the warm start v0 (n, r), r >= k (module docstring).

    Stops after at least ``min_iters`` iterations once the top-k residual is <= tol and the last
    iteration moved the top-k right subspace by <= eps (1 - Sim_K(V_before, V_after)); after
    ``max_iters`` without that it returns the exact SVD instead (``exact=True``).
    """
    d = d.float()
    fro = float(d.norm())
    r = v0.shape[1]
    if fro == 0.0:  # no update yet (e.g. a zero learning rate): no subspace, keep the start
        u = torch.eye(d.shape[0], r, device=d.device)
        return Estimate(u, torch.zeros(r, device=d.device), v0, 0.0, 0, 0.0, False)
    v = v0
    y = d @ v  # (m, r)
    res = math.inf
    for it in range(1, max_iters + 1):
        q = orth(y)  # (m, r)
        p, rr = torch.linalg.qr(d.mT @ q)  # (n, r), (r, r)
        ub, s, vbh = torch.linalg.svd(rr.mT)  # Rayleigh-Ritz on Q^T D P = R^T
        u, v_new = q @ ub, p @ vbh.mT  # (m, r), (n, r)
        moved = 1.0 - float(subspace_sim(v[:, :k], v_new[:, :k]))
        v = v_new
        dvk = d @ v[:, :k]  # (m, k): the residual test, and the first columns of the next D V
        res = ritz_residual(dvk, u[:, :k], s[:k])
        if it >= min_iters and res <= tol and moved <= eps:
            return Estimate(u, s, v, fro, it, res, False)
        if it < max_iters:
            y = torch.cat([dvk, d @ v[:, k:]], dim=1)  # (m, r)
    return _exact(d, r, fro, max_iters, res)


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
        """One step for matrix ``name`` with its current cumulative update d = W_t - W0 (m, n).

        refine: converge to REFINE_TOL (up to REFINE_MAX_ITERS) instead of the per-step test.
        """
        k, r = self.dims(tuple(d.shape))
        v0 = self._v.get(name)
        cold = v0 is None or v0.shape != (d.shape[1], r)
        if cold:
            v0 = random_basis(d.shape[1], r, self._seed(name))
        # a cold start has no earlier iterations to build on: give it the refined budget
        max_iters = max(self.max_iters, REFINE_MAX_ITERS) if refine or cold else self.max_iters
        tol = min(self.tol, REFINE_TOL) if refine else self.tol
        est = subspace_iteration(d, v0.to(d.device), k, tol=tol, eps=self.eps, min_iters=self.min_iters,
                                 max_iters=max_iters)
        self._v[name] = est.v
        return est

    def _seed(self, name: str) -> int:
        return self.seed + self._index.setdefault(name, len(self._index))


# ---- reading a store's tracking back as locking curves (the one I/O function here) ----

TRACK_METRICS = ("track_sim_final_u", "track_sim_final_v", "track_sim_prev_u", "track_sim_prev_v",
                 "track_stable_rank", "track_fro_norm", "track_s1")


def tracking_table(run_dir: str | Path, run: str | None = None) -> Table:
    """Per-step locking curves from a store's tracking state: one Row per (step, matrix, metric).

    Per matrix and tracked step t: Sim_K of the tracked top-K subspaces (U and V) to those of the
    final tracked step T and of the previous tracked step (NaN for the first, and for a zero update),
    stable rank ||D_t||_F^2 / s_1^2, ||D_t||_F and s_1. Metric names: TRACK_METRICS.
    """
    man = read_manifest(run_dir)
    label = run if run is not None else Path(run_dir).name
    steps = man.tracking_steps
    if not steps:
        return Table()
    final = read_tracking(run_dir, steps[-1])
    rows: list[Row] = []
    prev = None
    for step in steps:
        cur = final if step == steps[-1] else read_tracking(run_dir, step)
        for name, st in cur.items():
            layer, module = layer_of(name), module_of(name)
            vals = _step_values(st, final[name], prev[name] if prev else None)
            rows.extend(Row(label, step, name, layer, module, m, v) for m, v in vals.items())
        prev = cur
    return Table(rows)


def _step_values(st, fin, prev) -> dict[str, float]:
    nan = math.nan
    moved = st.fro > 0
    s1 = float(st.s[0]) if st.s.numel() else 0.0

    def sim(a, b):
        return float(subspace_sim(a, b)) if moved and b is not None else nan

    return {
        "track_sim_final_u": sim(st.u, fin.u if fin.fro > 0 else None),
        "track_sim_final_v": sim(st.v, fin.v if fin.fro > 0 else None),
        "track_sim_prev_u": sim(st.u, prev.u if prev is not None and prev.fro > 0 else None),
        "track_sim_prev_v": sim(st.v, prev.v if prev is not None and prev.fro > 0 else None),
        "track_stable_rank": st.fro**2 / s1**2 if s1 > 0 else nan,
        "track_fro_norm": st.fro,
        "track_s1": s1,
    }
