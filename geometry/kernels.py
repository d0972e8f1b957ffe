"""The float64 products under every decomposition: Gram matrices, products with thin matrices, norms.

A matrix stored narrower than float64 (float32, bf16) is widened a band of rows of its long side at a time
(``long_blocks``) and never copied whole: a 12288 x 4096 float64 copy is 400 MB. On the CPU the products go to
BLAS through numpy and ``geometry.lapack``, a matrix at a time: syrk forms a Gram matrix in half a general
product's flops, and numpy's dgemm is faster than torch's for float64 (benchmarks/bench_kernels.py). On the
GPU plan (geometry.plan) every product is one batched torch kernel on the whole tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geometry import lapack, plan
from geometry.buffers import Scratch, spare

# Matrices are widened, differenced and scored a band of rows at a time (``long_blocks``, offline.blocked, the
# masks' scores): BLOCK_BYTES of float64 a band, but at least BLOCK_ROWS rows, from where the bands' Gram
# matrices summed by syrk are as fast as the whole matrix's. Each band is a buffer a measuring thread holds, so
# smaller bands lower the peak memory and leave the heap less to fragment (benchmarks/bench_analyze.py measures
# both; benchmarks/README.md, "Measurements behind the engine's choices").
BLOCK_BYTES, BLOCK_ROWS = 1 << 20, 128


def gram(x: torch.Tensor, into: Scratch | None = None) -> torch.Tensor:
    """The float64 Gram matrix of the smaller side, (..., r, r): x^T x when m >= n, else x x^T; exactly
    symmetric. On the CPU by BLAS syrk, a matrix at a time; a matrix stored narrower than float64 is widened a
    block of rows of its long side at a time (``long_blocks``), the blocks' Gram matrices summed in place: no
    float64 copy of it. ``into``: a buffer it is formed in (then valid as long as that buffer's contents)."""
    m, n = x.shape[-2:]
    tall = m >= n
    if plan.gpu(x):
        x = x.double()
        return symmetric(x.mT @ x if tall else x @ x.mT)
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
    if x.dtype == torch.float64 or plan.gpu(x):
        return torch.linalg.matrix_norm(x.double())
    total = torch.zeros(x.shape[:-2], dtype=torch.float64)
    for _, block in long_blocks(x):
        total += torch.linalg.matrix_norm(block).square()
    return total.sqrt()


def long_product(x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """x's long side times thin X (..., r, k) in float64: x X when m >= n, else x^T X; a narrower x a block at
    a time (``long_blocks``)."""
    if x.dtype == torch.float64 or plan.gpu(x):
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
    if x.dtype == torch.float64 or plan.gpu(x):
        return mm(long_rows(x.double()).mT, Y)
    out = torch.zeros(*x.shape[:-2], min(x.shape[-2:]), Y.shape[-1], dtype=torch.float64)
    with spare() as product:
        for part, block in long_blocks(x):
            out += mm(block.mT, Y[..., part, :], product)
    return out


def mm(a: torch.Tensor, b: torch.Tensor, into: Scratch | None = None) -> torch.Tensor:
    """a @ b, batched. On the CPU by numpy's BLAS (dgemm), faster than torch's there for every float64 shape of
    this package (benchmarks/README.md, "Decomposition kernels"). ``into``: the product is written into that
    buffer (valid until its next use; CPU, operands of one dtype), not a new one."""
    if plan.gpu(a) or plan.gpu(b):
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
    if plan.gpu(gram):
        gram += d.mT @ d
        return
    for g, block in zip(gram.numpy(), d.numpy(), strict=True):
        # g.T is g's storage read as Fortran order; syrk fills its upper triangle, g's lower; block.T is
        # the block (C order, b x r) read as a Fortran r x b matrix A, and A A^T = block^T block
        lapack.syrk_add(g.T, block.T)


def symmetric(gram: torch.Tensor) -> torch.Tensor:
    """gram made exactly symmetric in place: on the CPU plan the lower triangle (``add_gram``'s) mirrored into the
    upper; on the GPU plan, whose products leave the two triangles a rounding apart, their mean."""
    if plan.gpu(gram):
        return gram.copy_(gram + gram.mT).mul_(0.5)  # (a + b) / 2 = (b + a) / 2 exactly
    r = gram.shape[-1]
    for g in gram.numpy():
        for i in range(0, r, 256):  # a band of rows at a time: no r x r temporary
            j = min(i + 256, r)
            diag = g[i:j, i:j]
            diag[...] = np.tril(diag) + np.tril(diag, -1).T
            g[i:j, j:] = g[j:, i:j].T
    return gram
