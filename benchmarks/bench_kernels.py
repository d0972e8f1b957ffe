"""The decomposition kernels side by side on one matrix shape, to choose the analyzer's paths by measurement.

For a Qwen3-8B-sized matrix (default 12288 x 4096, an MLP projection; --shape 4096x4096 for attention) this
times, in one process, one thread unless --threads: forming the float64 Gram matrix (torch matmul vs BLAS syrk),
the Gram eigenproblem (all eigenvalues; all eigenvalues and the top-k vectors; the full eigh), the SVD
(gesdd values only, and with vectors), a float32 Gram eigensolve for comparison, and the seeded randomized SVD
of the top k. Each row prints seconds and the ratio to the float64 Gram + eigenvalues (the floor's kernel),
plus the accuracy of the float32 and randomized spectra against the float64 ones.

    python benchmarks/bench_kernels.py                       # 12288 x 4096, k = 512 (the paper's)
    python benchmarks/bench_kernels.py --shape 4096x4096 --k 512
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="12288x4096")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy, scipy and torch load their BLAS
    import numpy as np
    import scipy.linalg as sl
    import torch

    from geometry import lapack
    from geometry.kernels import gram
    from geometry.linalg import randomized_svd
    from geometry.symeig import SymEig, sym_eig

    torch.set_num_threads(args.threads)
    m, n = map(int, args.shape.lower().split("x"))
    k = args.k
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(m, n, generator=g, dtype=torch.float64) * torch.linspace(1.5, 0.5, n, dtype=torch.float64))

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    rows = []
    t_mm, _ = timed(lambda: x.mT @ x if m >= n else x @ x.mT)
    rows.append(("Gram, torch matmul (float64)", t_mm))
    t_g, G = timed(lambda: gram(x))
    rows.append(("Gram, BLAS syrk (geometry.kernels.gram)", t_g))
    t_vals, (vals, _) = timed(lambda: sym_eig(G))
    rows.append(("all eigenvalues (LAPACK sytrd + sterf, no vectors)", t_vals))
    t_top, _ = timed(lambda: sym_eig(G, k))
    rows.append((f"all eigenvalues + top {k} vectors (sytrd/sterf/stein/ormtr)", t_top))
    tri = SymEig(G)._tri[0]  # the kept tridiagonalisation: its top k vectors alone, by the two methods
    r = tri.d.size
    t_stein, _ = timed(lambda: lapack.ormtr(tri.c, tri.tau, lapack.stein(tri.d, tri.e, tri.values[k - 1::-1])))
    rows.append((f"  of which the top {k} vectors by inverse iteration (stein/ormtr)", t_stein))
    t_mrrr, _ = timed(lambda: lapack.ormtr(tri.c, tri.tau, lapack.stemr(tri.d, tri.e, r - k + 1, r)))
    rows.append(("  the same by MRRR (stemr/ormtr), for comparison", t_mrrr))
    t_full, _ = timed(lambda: torch.linalg.eigh(G))
    rows.append(("full eigh, torch (all vectors)", t_full))
    t_sv, sv = timed(lambda: torch.linalg.svdvals(x))
    rows.append(("SVD values only (gesdd, float64)", t_sv))
    t_svd, _ = timed(lambda: torch.linalg.svd(x, full_matrices=False))
    rows.append(("SVD with vectors (gesdd, float64)", t_svd))
    G32 = G.float()
    t_32, v32 = timed(lambda: torch.linalg.eigvalsh(G32))
    rows.append(("all eigenvalues, float32 Gram", t_32))
    t_rs, _ = timed(lambda: randomized_svd(x, k, seed=0))
    rows.append((f"randomized SVD, top {k} (4 power steps, float64)", t_rs))
    floor = t_g + t_vals
    s64 = vals.clamp_min(0).sqrt()
    s32 = v32.double().flip(-1).clamp_min(0).sqrt()
    print(f"{m} x {n}, k = {k}, {args.threads} thread(s); floor kernel (syrk Gram + eigenvalues) {floor:.2f} s")
    for name, sec in rows:
        print(f"  {name:<62} {sec:8.2f} s  {sec / floor:6.2f}x floor")
    rel = ((s64 - sv) / sv[0]).abs().max().item()
    print(f"  float64 Gram spectrum vs SVD: max |error| / s1 = {rel:.1e}")
    print(f"  float32 Gram spectrum vs SVD: max |error| / s1 = {((s32 - sv) / sv[0]).abs().max().item():.1e}; "
          f"NSS of a 1e-5 shift cannot be read from it")
    del np, sl


if __name__ == "__main__":
    main()
