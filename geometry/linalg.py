"""Batched decompositions and subspace comparisons: exact, fast, and the checks between them.

Every function takes tensors batched over leading dimensions, ``(..., m, n)``, on whatever
device they live on, and works in float64: the metrics of SPEC.md need small angles and
spectral shifts of 1e-5 that float32 cannot resolve (SPEC items 2, 3).

Fast paths, each with the check that sends it back to the exact path:

- ``gram_svd``: eigendecomposition of the float64 Gram matrix of the smaller side. About 3x
  cheaper than an SVD on the CPU. Squaring the matrix loses the singular values below
  ~sqrt(eps64) * s1, so matrices that ill-conditioned fall back to ``exact_svd``.
- ``randomized_svd``: Halko et al. 2011, Alg. 4.4 (subspace iteration with re-orthonormalisation),
  seeded. Its top singular values are checked against a spectrum computed exactly; a miss
  falls back to ``exact_svd``.

On the CPU the two kernels under every path, the Gram matrix and its symmetric eigenproblem, go to
BLAS/LAPACK through numpy and ``geometry.lapack`` (scipy's LAPACK, the GIL released), a matrix at a time
(``gram``, ``sym_eig``): syrk forms a Gram matrix in half a general product's flops, and all eigenvalues with
only the top-k eigenvectors take one tridiagonalisation (sytrd), the eigenvalues of the tridiagonal (sterf),
k of its eigenvectors (stein, inverse iteration on those eigenvalues; MRRR where it fails) and a
back-transformation (ormtr), instead of a full eigh. Measured on one core, a 2816 x 1024 float64 matrix: Gram
0.13 -> 0.06 s, eigvalsh 0.10 -> 0.065 s, all eigenvalues and 128 vectors 0.235 -> 0.087 s.
On a GPU both stay torch's batched kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from geometry import lapack
from geometry.buffers import Scratch, spare

# Below this ratio s_min / s_max a Gram matrix has lost the small singular values (sqrt(eps64) ~ 1.5e-8),
# with a margin so that those it keeps are accurate to well under SPEC's 1% on the NSS.
GRAM_MIN_CONDITION = 1e-6


class SVD(NamedTuple):
    """A (possibly truncated) SVD x ~ U diag(S) V^T, batched.

    U: (..., m, k) left singular vectors; S: (..., r) all r = min(m, n) singular values, descending
    (the full spectrum even when only k vectors are kept); V: (..., n, k) right singular vectors;
    method: which path produced it ("exact", "gram", "randomized", or "<fast>->exact" after a fallback).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str


# Above this share of the eigenvectors a full eigh (divide and conquer) is cheaper than the tridiagonal
# path's k vectors (inverse iteration and a back-transformation, both growing with k; measured on one core for
# r = 1024: k = 128 0.087 s, 410 0.12 s, 512 0.16 s, 1024 0.29 s against 0.18 s for syevd; r = 256: k = 128
# 5.3 ms against 5.5; crossover near half).
FULL_EIGH_SHARE = 0.5


# Matrices are widened, differenced and scored a band of rows at a time (``long_blocks``, offline.blocked, the
# masks' scores): BLOCK_BYTES of float64 a band, but at least BLOCK_ROWS rows, from where the bands' Gram matrices
# summed by syrk are as fast as the whole matrix's (measured, one core, float32 stored, widened into one reused
# buffer: 2816 x 1024 78 ms at 128 rows, 80 at 256, 88 at 32; 1024 x 2816 84 ms at 128, 87 at 256; 12288 x 4096
# 4.39 s at 128 rows, 4.13 at 256, 4.07 at 512). Each band is a buffer a measuring thread holds, and a wide
# matrix's mask scores are bands of its long rows: the 90M pair on two threads peaked at 314 MB with 256 rows,
# 295 with 128 at the same time (12.6-12.8 s, 12.7-13.7); one 8B-shaped layer 748 -> 718 MB. Smaller bands also
# leave the heap less to fragment (8 MiB bands: 375 MB on one thread where 1 MiB took 351).
BLOCK_BYTES, BLOCK_ROWS = 1 << 20, 128


def gram(x: torch.Tensor, into: Scratch | None = None) -> torch.Tensor:
    """The float64 Gram matrix of the smaller side, (..., r, r): x^T x when m >= n, else x x^T; exactly
    symmetric. On the CPU by BLAS syrk, a matrix at a time; a matrix stored narrower than float64 is widened a
    block of rows of its long side at a time (``long_blocks``), the blocks' Gram matrices summed in place: no
    float64 copy of it. ``into``: a buffer it is formed in (then valid as long as that buffer's contents)."""
    m, n = x.shape[-2:]
    tall = m >= n
    if x.device.type != "cpu":
        x = x.double()
        return x.mT @ x if tall else x @ x.mT
    r = min(m, n)
    if x.dtype != torch.float64:
        shape = (*x.shape[:-2], r, r)
        G = torch.zeros(shape, dtype=torch.float64) if into is None else into.take(shape).zero_()
        for _, block in long_blocks(x):
            add_gram(G.view(-1, r, r), block.reshape(-1, *block.shape[-2:]))
        return symmetric(G.view(-1, r, r)).view(*x.shape[:-2], r, r)
    flat = x.reshape(-1, m, n).numpy()
    out = np.empty((flat.shape[0], r, r))
    for i, a in enumerate(flat):
        out[i] = a.T @ a if tall else a @ a.T  # numpy recognises the Gram product: syrk
    return torch.from_numpy(out).view(*x.shape[:-2], r, r)


def row_bands(n_rows: int, row_bytes: int) -> list[slice]:
    """The rows 0..n_rows in consecutive bands of ``BLOCK_BYTES`` (``row_bytes`` a row), at least ``BLOCK_ROWS``
    rows each (read when called: tests shrink them)."""
    step = max(1, BLOCK_ROWS, BLOCK_BYTES // max(1, row_bytes))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def long_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., m, n) with its long side as rows: x itself when m >= n, else x^T (a view, no copy). The one layout
    every band of rows is taken from (``long_blocks``, offline.blocked)."""
    return x if x.shape[-2] >= x.shape[-1] else x.mT


def long_band(x, part: slice) -> torch.Tensor:
    """Rows ``part`` of x's long side (``long_rows``) as stored: of a tensor, a view; of a matrix left in its
    file (geometry.offline.stored: anything with ``long_band``), read from it."""
    return long_rows(x)[..., part, :] if isinstance(x, torch.Tensor) else x.long_band(part)


def long_blocks(x):
    """(rows, float64 block (..., b, r)) over the rows of x's long side (x itself when m >= n, else x^T), each
    block a band of ``row_bands`` and valid until the next (``Scratch``); a wide x's blocks are its columns,
    widened in their stored order (the block is then a transposed view: no copy). x: a tensor, or a matrix
    left in its file (``long_band``)."""
    n_rows, r = max(x.shape[-2:]), min(x.shape[-2:])
    with spare() as scratch:
        for part in row_bands(n_rows, 8 * r * max(1, math.prod(x.shape[:-2]))):
            yield part, scratch.widen(long_band(x, part))


def fro_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||_F of each matrix (...), float64; a matrix stored narrower widened a block at a time
    (``long_blocks``): no float64 copy of it (torch's norm with a float64 dtype makes one)."""
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return torch.linalg.matrix_norm(x.double())
    total = torch.zeros(x.shape[:-2], dtype=torch.float64)
    for _, block in long_blocks(x):
        total += torch.linalg.matrix_norm(block).square()
    return total.sqrt()


def long_product(x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """x's long side times thin X (..., r, k) in float64: x X when m >= n, else x^T X; a narrower x a block at
    a time (``long_blocks``)."""
    if x.dtype == torch.float64 or x.device.type != "cpu":
        x = x.double()
        return mm(x if x.shape[-2] >= x.shape[-1] else x.mT, X)
    out = torch.empty(*x.shape[:-2], max(x.shape[-2:]), X.shape[-1], dtype=torch.float64)
    with spare() as product:
        for part, block in long_blocks(x):
            out[..., part, :] = mm(block, X, product)
    return out


def short_product(x: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """x's long side, transposed, times Y (..., long side, k) in float64: x^T Y when m >= n, else x Y, (..., r, k);
    a narrower x a block at a time (``long_blocks``): no float64 copy of it."""
    Y = Y.double()
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return mm(long_rows(x.double()).mT, Y)
    out = torch.zeros(*x.shape[:-2], min(x.shape[-2:]), Y.shape[-1], dtype=torch.float64)
    with spare() as product:
        for part, block in long_blocks(x):
            out += mm(block.mT, Y[..., part, :], product)
    return out


def mm(a: torch.Tensor, b: torch.Tensor, into: Scratch | None = None) -> torch.Tensor:
    """a @ b, batched. On the CPU by numpy's BLAS (dgemm), faster than torch's there for every float64 shape of
    this package (measured, one core: (2816 x 1024) @ (1024 x 128) 19.3 against 27.7 ms, the Gram matrix times a
    block 2.2 against 3.3 ms, a rank-16 reconstruction 3.2 against 7.7 ms). ``into``: the product is written
    into that buffer (valid until its next use; CPU, operands of one dtype), not a new one."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        return a @ b
    x, y = a.numpy(), b.numpy()
    if into is None or x.dtype != y.dtype:
        return torch.from_numpy(np.matmul(x, y))
    out = into.take((*np.broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-2], y.shape[-1]), a.dtype)
    np.matmul(x, y, out=out.numpy())
    return out


def add_gram(gram: torch.Tensor, d: torch.Tensor) -> None:
    """gram += d^T d for each matrix of the batch, (L, r, r) and (L, b, r); on the CPU by BLAS syrk into the
    lower triangle in place (no r x r temporary), mirrored by ``symmetric``."""
    if gram.device.type != "cpu":
        gram += d.mT @ d
        return
    for g, block in zip(gram.numpy(), d.numpy(), strict=True):
        # g.T is g's storage read as Fortran order; syrk fills its upper triangle, g's lower; block.T is
        # the block (C order, b x r) read as a Fortran r x b matrix A, and A A^T = block^T block
        lapack.syrk_add(g.T, block.T)


def symmetric(gram: torch.Tensor) -> torch.Tensor:
    """The lower triangle mirrored into the upper (on the CPU; elsewhere the sum is already symmetric)."""
    if gram.device.type != "cpu":
        return gram
    r = gram.shape[-1]
    for g in gram.numpy():
        for i in range(0, r, 256):  # a band of rows at a time: no r x r temporary
            j = min(i + 256, r)
            diag = g[i:j, i:j]
            diag[...] = np.tril(diag) + np.tril(diag, -1).T
            g[i:j, j:] = g[j:, i:j].T
    return gram


class SymEig:
    """The eigenproblem of symmetric (..., r, r) matrices, solved once: ``values`` (all, descending) at once and
    ``top(k)`` (the top-k eigenvectors, descending) when asked, without solving again.

    CPU: per matrix, LAPACK's tridiagonalisation Q^T G Q = T (sytrd) is kept; the eigenvalues come from T
    (sterf), and k eigenvectors from T (stemr, MRRR) taken back by Q (ormqr). Elsewhere torch's eigvalsh, then
    its eigh when vectors are asked. Raises torch.linalg.LinAlgError when LAPACK fails or G is not finite.
    ``overwrite``: G (float64, contiguous) may be destroyed, saving LAPACK a copy of it (CPU; then ``G`` is
    None and ``top`` works from the kept tridiagonalisation alone).
    """

    def __init__(self, G: torch.Tensor, *, overwrite: bool = False):
        G = _finite(G.double())
        self.G, self.r, self.batch, self.device = G, G.shape[-1], G.shape[:-2], G.device
        if G.device.type != "cpu":
            self.values = torch.linalg.eigvalsh(G).flip(-1)
            return
        self._tri = [_tridiagonal(g, overwrite) for g in G.reshape(-1, self.r, self.r).numpy()]
        self.values = torch.from_numpy(np.stack([t.values for t in self._tri])).view(*self.batch, self.r)
        if overwrite:
            self.G = None

    def vector_flops(self, k: int) -> float:
        """What ``top(k)`` costs a matrix: on the CPU the back-transformation of k vectors (~4 r^2 k flops; the
        kept tridiagonal gives them by inverse iteration, O(r k)); elsewhere a full eigh (~9 r^3)."""
        return 4.0 * self.r * self.r * k if self.device.type == "cpu" else 9.0 * self.r ** 3

    def top(self, k: int) -> torch.Tensor:
        """The top-k eigenvectors (..., r, k), descending (all r when k > r)."""
        k = min(k, self.r)
        if self.device.type != "cpu":
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
        # inverse iteration on the known eigenvalues: 4.7x faster than MRRR (measured, r = 1024, k = 128: 8 against
        # 38 ms) and as accurate (residual 2e-15 and orthogonality 6e-15, against 1e-14 and 9e-14); MRRR if it fails
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
    the same order (None when k = 0; all r when k > r): ``SymEig``, or on the CPU a full eigh (syevd) where
    more than ``FULL_EIGH_SHARE`` of the vectors are asked. Raises torch.linalg.LinAlgError as ``SymEig``.
    """
    G = G.double()
    r = G.shape[-1]
    k = min(k, r)
    if G.device.type == "cpu" and k >= FULL_EIGH_SHARE * r and k > 0:
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
    contiguous) is destroyed on the CPU. There by MRRR (LAPACK syevr), whose workspace is O(r) where divide and
    conquer's is 2 r^2 (a 4096 x 4096 matrix: under 1 MB against 268; measured, one core, 7% slower at
    r = 1024 and 2048), the vectors not copied after."""
    if G.device.type != "cpu":
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
    if not _well_conditioned(S if small_values else S[..., :k]):
        return _fallback(x, k, "gram")
    # a zero matrix has zero vectors here rather than NaN: callers mask zero updates out
    big = long_product(x, small) / S[..., None, :k].clamp_min(torch.finfo(S.dtype).tiny)
    U, V = (big, small) if tall else (small, big)
    return SVD(U, S, V, "gram")


def gram_top(x: torch.Tensor, k: int, *, warm: torch.Tensor | None = None, tol: float = 1e-7, max_iter: int = 60,
             seed: int = 0, iterate: bool | None = None) -> SVD:
    """Top-k singular vectors and the full spectrum, for a matrix whose small singular values need not be
    resolved (an update): ``top_from_gram`` on its float64 Gram matrix (the blocked update's path, whole)."""
    m, n = x.shape[-2:]
    return top_from_gram(gram(x), k, lambda X: long_product(x, X), lambda: x.double(), tall=m >= n, warm=warm,
                         tol=tol, max_iter=max_iter, seed=seed, iterate=iterate)


def top_from_gram(G: torch.Tensor, k: int, long: Callable[[torch.Tensor], torch.Tensor],
                  dense: Callable[[], torch.Tensor], *, tall: bool, warm: torch.Tensor | None = None,
                  tol: float = 1e-7, max_iter: int = 60, seed: int = 0, iterate: bool | None = None,
                  overwrite: bool = False) -> SVD:
    """Top-k singular vectors and the full spectrum of a matrix x from its Gram matrix G (of the smaller side):
    all eigenvalues, then the top-k eigenvectors by ``top_eigvecs`` (certified subspace iteration, or the
    eigensolver's own where that is cheaper); the long side's vectors by ``long(X)`` (x X when ``tall``, else
    x^T X). A Gram matrix that cannot resolve the top k (LAPACK failure, s_k below ~1e-6 s1) sends ``dense()``
    (x whole, float64) to ``exact_svd``, method "subspace->exact". ``overwrite``: G may be destroyed (``SymEig``;
    on the CPU the eigensolver's own vectors are then taken)."""
    try:
        eig = SymEig(G, overwrite=overwrite)
        found = top_eigvecs(eig, k, warm=warm, tol=tol, max_iter=max_iter, seed=seed, iterate=iterate)
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


def top_eigvecs(eig: SymEig, k: int, *, warm: torch.Tensor | None = None, tol: float = 1e-7, max_iter: int = 60,
                seed: int = 0, iterate: bool | None = None) -> tuple[torch.Tensor, str] | None:
    """The top-k eigenvectors (..., r, k), descending, of Gram matrices G (..., r, r) whose eigenproblem ``eig``
    has its eigenvalues, and how they were found; None when G cannot resolve them (s_k below ~1e-6 s1: the
    caller takes the exact SVD). Needs G only, not the matrix it came from.

    By subspace iteration with Rayleigh-Ritz, certified against the exact eigenvalues with Davis-Kahan's
    sin-theta bound (Davis & Kahan 1970; Saad 2011, Thm 4.11): with Ritz pairs (X, theta) and residual
    R = G X - X diag(theta), ||sin Theta(X, top-k eigenspace)||_F <= ||R||_F / (theta_k - lambda_{k+1}).
    Iteration stops once every matrix's bound is below ``tol`` (Sim_K then moves by at most ~2 tol), method
    "subspace". A matrix that has not got there in ``max_iter`` steps, or whose gap lambda_k - lambda_{k+1}
    vanishes, takes ``eig``'s own vectors ("subspace->gram", no second solve); so does one where the iteration
    cannot win on cost ("gram"): on the CPU it never does, ``eig`` keeping its tridiagonal (``SymEig.vector_flops``);
    ``iterate=True`` iterates wherever the gap allows (a GPU's path, so tested on the CPU too). ``warm``: a start
    (..., r, >= k), e.g. the previous checkpoint's vectors; else a seeded Gaussian one. Costs a few r x r x 2k
    products instead of a full eigh.
    """
    G, evals = eig.G, eig.values
    r = eig.r
    tiny = torch.finfo(evals.dtype).tiny

    def eigh(method: str):
        if not _well_conditioned(singular_values(evals[..., :k])):
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
    if G is None or steps > (max_iter if iterate else min(max_iter, eig.vector_flops(k) / (3 * r * r * p))):
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
        if _well_conditioned(S):
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


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), orthonormal (..., m, k).

    Small angles come from sines, sigma(B - A A^T B), and large ones from cosines, sigma(A^T B)
    (Knyazev & Argentati 2002): arccos of a cosine near 1 loses every digit of a small angle.
    """
    A, B = A.double(), B.double()
    C = mm(A.mT, B)  # (..., k, k)
    cos = torch.linalg.svdvals(C).clamp(0, 1)  # descending -> angles ascending
    with spare() as scratch:  # B - A C formed in one buffer (m x k: 2.9 MB for a 2816 x 1024 matrix at k = 128)
        residual = mm(A, C, scratch)
        sin = torch.linalg.svdvals(torch.sub(B, residual, out=residual)).clamp(0, 1).flip(-1)  # ascending
    k = cos.shape[-1]
    # B wider than A: its extra directions are orthogonal to span(A), sines of 1 that sort last
    sin = sin[..., :k] if sin.shape[-1] >= k else torch.nn.functional.pad(sin, (k - sin.shape[-1], 0))
    from_cos, from_sin = torch.arccos(cos), torch.arcsin(sin)
    return torch.where(cos * cos > 0.5, from_sin, from_cos)


def subspace_sim(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Sim_K(A, B) = ||A^T B||_F^2 / K for orthonormal (..., n, K) bases (SPEC item 7); in [0, 1]."""
    K = A.shape[-1]
    return mm(A.double().mT, B.double()).square().sum((-2, -1)) / K


def _well_conditioned(S: torch.Tensor) -> bool:
    top = S[..., 0]
    if not torch.isfinite(S).all():
        return False
    # An all-zero matrix is fine (its spectrum is exactly zero); otherwise require s_min / s_max above the floor.
    nonzero = top > 0
    return bool((S[..., -1][nonzero] >= GRAM_MIN_CONDITION * top[nonzero]).all())


def _fallback(x: torch.Tensor, k: int, fast: str) -> SVD:
    res = exact_svd(x, k)
    return res._replace(method=f"{fast}->exact")


def degrees(radians: torch.Tensor) -> torch.Tensor:
    return radians * (180.0 / math.pi)
