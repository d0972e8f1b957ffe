"""The eigenproblem of symmetric Gram matrices (..., r, r): all eigenvalues, the top-k eigenvectors, and what
they resolve of the singular values of the matrix the Gram matrix came from.

- ``SymEig`` / ``sym_eig``: every eigenvalue and the top-k eigenvectors from one solve. On the CPU, LAPACK a
  matrix at a time: one tridiagonalisation gives all eigenvalues, and the k vectors cost only inverse iteration
  and a back-transformation, not a full eigh. On the GPU plan (geometry.plan), torch's batched eigvalsh and eigh.
- ``top_eigvecs``: the top-k eigenvectors by subspace iteration, certified against the exact eigenvalues by
  Davis-Kahan's bound, where that is cheaper than the eigensolver's own (on the GPU plan).
- ``singular_values`` and ``well_conditioned``: singular values from Gram eigenvalues, and whether a Gram matrix
  resolved them. Squaring a matrix loses its singular values below ~sqrt(eps64) s1.

Every function raises torch.linalg.LinAlgError where LAPACK fails or a Gram matrix is not finite: callers fall
back to the exact SVD (geometry.linalg).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geometry import lapack, plan
from geometry.kernels import mm

# Below this ratio s_min / s_max a Gram matrix has lost the small singular values (sqrt(eps64) ~ 1.5e-8),
# with a margin so that those it keeps are accurate to well under SPEC's 1% on the NSS.
GRAM_MIN_CONDITION = 1e-6

# Above this share of the eigenvectors a full eigh (divide and conquer) is cheaper than the tridiagonal path's k
# vectors (inverse iteration and a back-transformation, both growing with k); the crossover is near half
# (benchmarks/bench_kernels.py --k, its rows "all eigenvalues + top k vectors" and "full eigh").
FULL_EIGH_SHARE = 0.5


class SymEig:
    """The eigenproblem of symmetric (..., r, r) matrices, solved once: ``values`` (all, descending) at once and
    ``top(k)`` (the top-k eigenvectors, descending) when asked, without solving again.

    CPU: per matrix, LAPACK's tridiagonalisation Q^T G Q = T (sytrd) is kept; the eigenvalues come from T
    (sterf); k eigenvectors of T by inverse iteration on those eigenvalues (stein), or by MRRR (stemr) where
    inverse iteration fails, taken back to G's basis by Q (ormtr). On the GPU plan (geometry.plan, chosen when
    it is made) torch's eigvalsh, then its eigh when vectors are asked. Raises torch.linalg.LinAlgError when
    LAPACK fails or G is not finite. ``overwrite``: G (float64, contiguous) may be destroyed, saving LAPACK a copy
    of it (CPU plan; then ``G`` is None and ``top`` works from the kept tridiagonalisation alone).
    """

    def __init__(self, G: torch.Tensor, *, overwrite: bool = False):
        G = _finite(G.double())
        self.G, self.r, self.batch, self.batched = G, G.shape[-1], G.shape[:-2], plan.gpu(G)
        if self.batched:
            self.values = torch.linalg.eigvalsh(G).flip(-1)
            return
        self._tri = [_tridiagonal(g, overwrite) for g in G.reshape(-1, self.r, self.r).numpy()]
        self.values = torch.from_numpy(np.stack([t.values for t in self._tri])).view(*self.batch, self.r)
        if overwrite:
            self.G = None

    def vector_flops(self, k: int) -> float:
        """What ``top(k)`` costs a matrix: on the CPU plan the back-transformation of k vectors (~4 r^2 k flops;
        the kept tridiagonal gives them by inverse iteration, O(r k)); on the GPU plan a full eigh (~9 r^3)."""
        return 9.0 * self.r ** 3 if self.batched else 4.0 * self.r * self.r * k

    def top(self, k: int) -> torch.Tensor:
        """The top-k eigenvectors (..., r, k), descending (all r when k > r)."""
        k = min(k, self.r)
        if self.batched:
            return torch.linalg.eigh(self.G)[1].flip(-1)[..., :k]
        return torch.from_numpy(np.stack([t.top(k) for t in self._tri])).view(*self.batch, self.r, k)


class _Tridiagonal:
    """One matrix's sytrd output: reflectors c and tau, the tridiagonal (d, e), and its eigenvalues."""

    def __init__(self, c: np.ndarray, d: np.ndarray, e: np.ndarray, tau: np.ndarray, values: np.ndarray):
        self.c, self.d, self.e, self.tau, self.values = c, d, e, tau, values

    def top(self, k: int) -> np.ndarray:
        r = self.d.shape[0]
        if k == 0:
            return np.empty((r, 0))
        # inverse iteration on the known eigenvalues: faster than MRRR and as accurate (benchmarks/bench_kernels.py,
        # tests/test_lapack.py); MRRR where it fails
        try:
            z = lapack.stein(self.d, self.e, self.values[k - 1::-1])
        except torch.linalg.LinAlgError:
            z = lapack.stemr(self.d, self.e, r - k + 1, r)
        z = lapack.ormtr(self.c, self.tau, z)  # ascending, in G's basis
        return z[:, ::-1]


def _finite(G: torch.Tensor) -> torch.Tensor:
    if not math.isfinite(G.sum().item()):  # a NaN or Inf entry (or, harmlessly, a sum that overflows)
        raise torch.linalg.LinAlgError("sym_eig: the matrix holds NaN or Inf")
    return G


def _lapack_input(g: np.ndarray, overwrite: bool) -> np.ndarray:
    """What LAPACK may overwrite, in Fortran order: g symmetric, its transpose is the same matrix in that order."""
    return g.T if overwrite and g.flags.c_contiguous else np.array(g, order="F")


def _tridiagonal(g: np.ndarray, overwrite: bool) -> _Tridiagonal:
    a = _lapack_input(g, overwrite)
    d, e, tau = lapack.sytrd(a)  # Q^T G Q = tridiag(d, e), Q's reflectors left in a
    w = lapack.sterf(d, e)  # every eigenvalue, ascending
    return _Tridiagonal(a, d, e, tau, w[::-1].copy())


def sym_eig(G: torch.Tensor, k: int = 0, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All eigenvalues of symmetric (..., r, r) matrices, descending, and the top-k eigenvectors (..., r, k) in
    the same order (None when k = 0; all r when k > r): ``SymEig``, or on the CPU plan a full eigh (syevd)
    where more than ``FULL_EIGH_SHARE`` of the vectors are asked. Raises torch.linalg.LinAlgError as ``SymEig``.
    """
    G = G.double()
    r = G.shape[-1]
    k = min(k, r)
    if not plan.gpu(G) and k >= FULL_EIGH_SHARE * r and k > 0:
        _finite(G)
        pairs = [_full_eig(g, k, overwrite) for g in G.reshape(-1, r, r).numpy()]
        return (torch.from_numpy(np.stack([w for w, _ in pairs])).view(*G.shape[:-2], r),
                torch.from_numpy(np.stack([v for _, v in pairs])).view(*G.shape[:-2], r, k))
    eig = SymEig(G, overwrite=overwrite)
    return eig.values, (eig.top(k) if k else None)


def _full_eig(g: np.ndarray, k: int, overwrite: bool) -> tuple[np.ndarray, np.ndarray]:
    """One symmetric matrix by syevd (divide and conquer): all eigenvalues and the top-k vectors, descending."""
    a = _lapack_input(g, overwrite)
    w, v = lapack.syevd(a)
    return w[::-1].copy(), v[:, ::-1][:, :k].copy()


def all_eigenpairs(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every eigenvalue and eigenvector of one symmetric r x r matrix, in no promised order; G (float64,
    contiguous) is destroyed on the CPU plan. There by MRRR (LAPACK syevr), whose workspace is O(r) where divide
    and conquer's is 2 r^2 (for r = 4096, under 1 MB against 268), the vectors not copied after; on the GPU plan
    by torch's eigh."""
    if plan.gpu(G):
        return torch.linalg.eigh(G.double())
    _finite(G)
    w, z = lapack.syevr(_lapack_input(G.numpy(), overwrite=True))
    return torch.from_numpy(w), torch.from_numpy(z)


def singular_values(evals: torch.Tensor, *, resolved_only: bool = False) -> torch.Tensor:
    """Singular values from Gram eigenvalues (..., r), descending. ``resolved_only``: eigenvalues within the
    eigensolver's error of zero (r eps lambda_1, a backward-stable solver's bound) give 0, not the square root
    of rounding noise (~1e-7 s1 each): an exactly low-rank update then has an exactly zero tail, and its
    effective rank is not raised by r tiny values. A matrix asked for all its values is well-conditioned
    (``GRAM_MIN_CONDITION``) and keeps them as they are."""
    evals = evals.clamp_min(0)
    if not resolved_only:
        return evals.sqrt()
    floor = evals.shape[-1] * torch.finfo(evals.dtype).eps * evals[..., :1]
    return torch.where(evals > floor, evals, torch.zeros_like(evals)).sqrt()


def well_conditioned(S: torch.Tensor) -> bool:
    """Whether singular values S (..., r), descending, are what a Gram matrix resolves: all finite and, for every
    matrix that is not exactly zero, s_min >= ``GRAM_MIN_CONDITION`` s_max."""
    top = S[..., 0]
    if not torch.isfinite(S).all():
        return False
    nonzero = top > 0  # an all-zero matrix is fine: its spectrum is exactly zero
    return bool((S[..., -1][nonzero] >= GRAM_MIN_CONDITION * top[nonzero]).all())


def top_eigvecs(eig: SymEig, k: int, *, warm: torch.Tensor | None = None, tol: float = 1e-7, max_iter: int = 60,
                seed: int = 0) -> tuple[torch.Tensor, str] | None:
    """The top-k eigenvectors (..., r, k), descending, of Gram matrices G (..., r, r) whose eigenproblem ``eig``
    has its eigenvalues, and how they were found; None when G cannot resolve them (s_k below ~1e-6 s1: the
    caller takes the exact SVD). Needs G only, not the matrix it came from.

    By subspace iteration with Rayleigh-Ritz, certified against the exact eigenvalues with Davis-Kahan's
    sin-theta bound (Davis & Kahan 1970; Saad 2011, Thm 4.11): with Ritz pairs (X, theta) and residual
    R = G X - X diag(theta), ||sin Theta(X, top-k eigenspace)||_F <= ||R||_F / (theta_k - lambda_{k+1}).
    Iteration stops once every matrix's bound is below ``tol`` (Sim_K then moves by at most ~2 tol), method
    "subspace". A matrix that has not got there in ``max_iter`` steps, or whose gap lambda_k - lambda_{k+1}
    vanishes, takes ``eig``'s own vectors ("subspace->gram", no second solve); so does one where the iteration
    cannot win on cost ("gram"): on the CPU plan it never does, ``eig`` keeping its tridiagonal
    (``SymEig.vector_flops``). ``warm``: a start (..., r, >= k), e.g. the previous checkpoint's vectors; else a
    seeded Gaussian one. Costs a few r x r x 2k products instead of a full eigh.
    """
    G, evals = eig.G, eig.values
    r = eig.r
    tiny = torch.finfo(evals.dtype).tiny

    def eigh(method: str):
        if not well_conditioned(singular_values(evals[..., :k])):
            return None
        return eig.top(k), method

    if 2 * k + 8 >= r:  # no room for a block much wider than k: eigh is as cheap
        return eigh("gram")
    p = 2 * k  # block size: convergence goes as (lambda_{p+1} / lambda_k) per step
    scale = evals[..., :1].clamp_min(tiny)  # (..., 1)
    gap = (evals[..., k - 1] - evals[..., k]) / scale[..., 0]  # relative gap lambda_k - lambda_{k+1}
    if not bool((gap > 1e3 * torch.finfo(evals.dtype).eps).all()):
        return eigh("subspace->gram")
    # steps to converge from a random start go as log(tol) / log(lambda_{p+1} / lambda_k); past what the vectors
    # cost ``eig`` (against ~3 r^2 p flops a step) the iteration cannot win: its vectors at once. Nor can it
    # run without G (an eigenproblem solved in G's place, ``SymEig(overwrite=True)``)
    rate = (evals[..., p] / evals[..., k - 1].clamp_min(tiny)).max().item()
    steps = math.log(tol) / math.log(rate) if 0 < rate < 1 else math.inf
    if G is None or steps > min(max_iter, eig.vector_flops(k) / (3 * r * r * p)):
        return eigh("gram")
    gen = torch.Generator(device=G.device).manual_seed(seed)
    if warm is not None and warm.shape[-2] == r and warm.shape[-1] >= k:
        Q = warm[..., :p].double()
        if Q.shape[-1] < p:
            extra = torch.randn(*Q.shape[:-1], p - Q.shape[-1], generator=gen, device=G.device, dtype=G.dtype)
            Q = torch.cat([Q, extra], -1)
    else:
        Q = torch.randn(*G.shape[:-1], p, generator=gen, device=G.device, dtype=G.dtype)  # (..., r, p)
    Q = torch.linalg.qr(Q).Q
    for _ in range(max_iter):
        Z = mm(G, Q)  # (..., r, p) the one product per step: Rayleigh-Ritz, residual and next step share it
        theta, Y = torch.linalg.eigh(mm(Q.mT, Z))  # Rayleigh-Ritz, ascending
        Y = Y.flip(-1)
        X, GX = mm(Q, Y[..., :k]), mm(Z, Y[..., :k])  # (..., r, k) Ritz vectors (descending) and G times them
        theta = theta.flip(-1)[..., :k]
        resid = torch.linalg.matrix_norm(GX - X * theta[..., None, :])  # (...)
        delta = theta[..., -1] - evals[..., k]
        bound = resid / delta.clamp_min(tiny)
        if bool(((delta > 0) & (bound <= tol)).all()):
            return X, "subspace"
        Q = torch.linalg.qr(mm(Z, Y)).Q  # the next power step, from the Ritz basis (best vectors first)
    return eigh("subspace->gram")
