"""Batched SVDs in float64: the exact one, the fast ones, and the checks that send a fast one back to it.

Every function takes tensors batched over leading dimensions, ``(..., m, n)``, on whatever device they live on,
and works in float64: the metrics of SPEC.md need small angles and spectral shifts of 1e-5 that float32 cannot
resolve (SPEC items 2, 3).

- ``exact_svd``: LAPACK's SVD, the reference every other path is tested against.
- ``gram_svd``: the eigenproblem of the float64 Gram matrix of the smaller side (geometry.symeig), several times
  cheaper than an SVD on the CPU (benchmarks/bench_kernels.py). Squaring the matrix loses the singular values
  below ~sqrt(eps64) s1, so a matrix that ill-conditioned falls back to ``exact_svd``.
- ``top_from_gram``: an update's spectrum and top-k vectors from its Gram matrix alone (formed a block at a
  time, geometry.offline.blocked), the vectors certified (``symeig.top_eigvecs``).
- ``factored_svd``: exact, from the factors of a low-rank product (a LoRA update B A).
- ``randomized_svd``: Halko et al. 2011, Alg. 4.4, seeded; its top values are checked against a spectrum
  computed exactly, and a miss falls back to ``exact_svd``.

A path that fell back says so in ``SVD.method`` ("<fast>->exact").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from geometry.buffers import spare
from geometry.kernels import gram, long_product
from geometry.symeig import SymEig, singular_values, sym_eig, top_eigvecs, well_conditioned


class SVD(NamedTuple):
    """A (possibly truncated) SVD x ~ U diag(S) V^T, batched.

    U: (..., m, k) left singular vectors; S: (..., r) all r = min(m, n) singular values, descending
    (the full spectrum even when only k vectors are kept); V: (..., n, k) right singular vectors;
    method: which path produced it ("exact", "gram", "factored", "randomized", "subspace" or "subspace->gram"
    from ``top_from_gram``; "<fast>->exact" after a fallback).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str


def exact_svd(x: torch.Tensor, k: int | None = None) -> SVD:
    """The reference: LAPACK SVD in float64, thin; keeps the top-k vectors (all when k is None)."""
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    if k is None:
        return SVD(U, S, Vh.mT, "exact")
    # copies, so that keeping the top-k vectors does not keep all of them alive
    return SVD(U[..., :k].clone(), S, Vh.mT[..., :k].clone(), "exact")


def factored_svd(L: torch.Tensor, R: torch.Tensor, k: int) -> SVD:
    """The SVD of a product x = L R of rank <= r, from its factors: L (..., m, r), R (..., r, n), k <= r.

    L = Q1 T1 and R^T = Q2 T2 (thin QR), so x = Q1 (T1 T2^T) Q2^T and the SVD of the r x r core
    C = U_c S V_c^T gives x's: U = Q1 U_c, V = Q2 V_c, the spectrum S padded with zeros to min(m, n).
    O((m + n) r^2) instead of O(m n min(m, n)), and exact: x is never formed (a LoRA update B A).
    """
    L, R = L.double(), R.double()
    m, n = L.shape[-2], R.shape[-1]
    q1, t1 = torch.linalg.qr(L)  # (..., m, r), (..., r, r)
    q2, t2 = torch.linalg.qr(R.mT)  # (..., n, r), (..., r, r)
    uc, s, vch = torch.linalg.svd(t1 @ t2.mT)  # (..., r, r)
    full = torch.zeros((*s.shape[:-1], min(m, n)), dtype=s.dtype, device=s.device)
    full[..., : s.shape[-1]] = s[..., : min(m, n)]
    return SVD(q1 @ uc[..., :k], full, q2 @ vch.mT[..., :k], "factored")


def gram_svd(x: torch.Tensor, k: int | None = None, *, small_values: bool = True) -> SVD:
    """Top-k singular vectors and the full spectrum from the float64 Gram matrix's eigenvalues and top-k
    eigenvectors (``sym_eig``).

    With m >= n: x^T x = V diag(S^2) V^T, then U_k = x V_k / S_k (and symmetrically for m < n).
    Falls back to ``exact_svd`` when the eigensolver fails or the matrix is too ill-conditioned for the Gram
    matrix to hold what is asked: every singular value (``small_values``, as the spectral shift needs),
    or only the top k and their vectors (enough for rank metrics and subspaces of an update, which is
    often exactly low-rank).
    """
    m, n = x.shape[-2:]
    k = min(m, n) if k is None else k
    tall = m >= n
    try:  # x as stored: gram and long_product widen it a block at a time; the Gram matrix solved in its place
        with spare() as buffer:  # first: the one this thread keeps (geometry.buffers)
            evals, small = sym_eig(gram(x, buffer), k, overwrite=True)  # (..., r) descending, (..., r, k)
    except torch.linalg.LinAlgError:
        return _fallback(x, k, "gram")
    S = singular_values(evals, resolved_only=not small_values)
    if not well_conditioned(S if small_values else S[..., :k]):
        return _fallback(x, k, "gram")
    # a zero matrix has zero vectors here rather than NaN: callers mask zero updates out
    big = long_product(x, small) / S[..., None, :k].clamp_min(torch.finfo(S.dtype).tiny)
    U, V = (big, small) if tall else (small, big)
    return SVD(U, S, V, "gram")


def top_from_gram(G: torch.Tensor, k: int, long: Callable[[torch.Tensor], torch.Tensor],
                  dense: Callable[[], torch.Tensor], *, tall: bool, warm: torch.Tensor | None = None,
                  tol: float = 1e-7, max_iter: int = 60, seed: int = 0, overwrite: bool = False) -> SVD:
    """Top-k singular vectors and the full spectrum of a matrix x from its Gram matrix G (of the smaller side):
    all eigenvalues, then the top-k eigenvectors by ``top_eigvecs`` (certified subspace iteration, or the
    eigensolver's own where that is cheaper); the long side's vectors by ``long(X)`` (x X when ``tall``, else
    x^T X). A Gram matrix that cannot resolve the top k (LAPACK failure, s_k below ~1e-6 s1) sends ``dense()``
    (x whole, float64) to ``exact_svd``, method "subspace->exact". ``overwrite``: G may be destroyed (``SymEig``;
    on the CPU plan the eigensolver's own vectors are then taken)."""
    try:
        eig = SymEig(G, overwrite=overwrite)
        found = top_eigvecs(eig, k, warm=warm, tol=tol, max_iter=max_iter, seed=seed)
    except torch.linalg.LinAlgError:
        found = None
    if found is None:
        return _fallback(dense(), k, "subspace")
    X, method = found
    S = singular_values(eig.values, resolved_only=True)
    # a zero matrix has zero vectors here rather than NaN: callers mask zero updates out
    big = long(X) / S[..., None, :k].clamp_min(torch.finfo(S.dtype).tiny)
    U, V = (big, X) if tall else (X, big)
    return SVD(U, S, V, method)


def spectrum(x: torch.Tensor, *, small_values: bool = True) -> torch.Tensor:
    """All singular values, descending, float64, from Gram eigenvalues.

    With ``small_values`` (spectral shift needs them) an ill-conditioned matrix goes to the exact SVD.
    Without it, values below ~1e-8 * s1 may be off by ~1e-8 * s1, which no rank metric can see
    (an update D is often exactly low-rank, and would otherwise always take the slow path).
    """
    x = x.double()
    try:
        S = singular_values(sym_eig(gram(x))[0], resolved_only=not small_values)
        if not small_values:
            return S
        if well_conditioned(S):
            return S
    except torch.linalg.LinAlgError:
        pass
    return torch.linalg.svdvals(x)


def randomized_svd(x: torch.Tensor, k: int, *, oversample: int = 8, n_iter: int = 4, seed: int = 0,
                   check: torch.Tensor | None = None, rtol: float = 1e-3) -> SVD:
    """Top-k singular triplets by seeded randomized subspace iteration (Halko et al. 2011, Alg. 4.4).

    ``check``, when given, is the exact spectrum of x (..., r): if the estimated top-k singular values
    miss it by more than ``rtol`` relative to s1, the result is replaced by the exact SVD. The returned
    S is ``check`` when given (the exact spectrum), else the k estimated values.
    """
    x = x.double()
    m, n = x.shape[-2:]
    p = min(k + oversample, m, n)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(*x.shape[:-2], n, p, generator=gen, device=x.device, dtype=x.dtype)  # (..., n, p)
    try:
        Q = torch.linalg.qr(x @ omega).Q  # (..., m, p)
        for _ in range(n_iter):
            Q = torch.linalg.qr(x.mT @ Q).Q  # (..., n, p)
            Q = torch.linalg.qr(x @ Q).Q  # (..., m, p)
        Ub, Sb, Vbh = torch.linalg.svd(Q.mT @ x, full_matrices=False)  # (..., p, p), (..., p), (..., p, n)
    except torch.linalg.LinAlgError:
        return _fallback(x, k, "randomized")
    U, S, V = Q @ Ub[..., :k], Sb[..., :k], Vbh.mT[..., :k]
    if not torch.isfinite(S).all():
        return _fallback(x, k, "randomized")
    if check is not None:
        scale = check[..., :1].clamp_min(torch.finfo(x.dtype).tiny)
        if ((S - check[..., :k]).abs() / scale).max() > rtol:
            return _fallback(x, k, "randomized")
        S = check
    return SVD(U, S, V, "randomized")


def _fallback(x: torch.Tensor, k: int, fast: str) -> SVD:
    res = exact_svd(x, k)
    return res._replace(method=f"{fast}->exact")
