"""geometry.lapack: each routine against scipy's f2py wrapper or numpy on the same data, and the GIL released."""

import threading
import time

import numpy as np
import pytest
import torch
from scipy.linalg import lapack as ref

from geometry import lapack


def spd(r: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((r + 7, r))
    return x.T @ x


@pytest.mark.parametrize("r", [1, 2, 5, 64])
def test_sytrd_and_sterf_match_scipy_bit_for_bit(r):
    G = spd(r)
    a = np.array(G, order="F")
    d, e, tau = lapack.sytrd(a)
    lw, _ = ref.dsytrd_lwork(r, lower=1)
    c, d0, e0, tau0, info = ref.dsytrd(G, lower=1, lwork=int(lw))
    assert info == 0
    assert np.array_equal(d, d0) and np.array_equal(e, e0) and np.array_equal(tau, tau0) and np.array_equal(a, c)
    w = lapack.sterf(d, e)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(G), rtol=0, atol=1e-12 * w[-1])
    assert np.array_equal(d, d0)  # sterf works on copies


@pytest.mark.parametrize("r, k", [(1, 1), (6, 2), (64, 10), (64, 64)])
def test_stemr_and_ormtr_give_the_top_eigenvectors(r, k):
    G = spd(r, seed=1)
    a = np.array(G, order="F")
    d, e, tau = lapack.sytrd(a)
    z = lapack.ormtr(a, tau, lapack.stemr(d, e, r - k + 1, r))  # (r, k), ascending
    w, v = np.linalg.eigh(G)
    np.testing.assert_allclose(np.abs(np.sum(z * v[:, r - k:], axis=0)), 1.0, atol=1e-10)  # same vectors, up to sign
    np.testing.assert_allclose(z.T @ z, np.eye(k), atol=1e-12)


@pytest.mark.parametrize("case", ["random", "identity", "low rank", "split", "clustered"])
def test_stein_gives_stemrs_eigenvectors(case):
    """Inverse iteration on the sterf eigenvalues: the top vectors MRRR gives (up to sign, and up to a rotation
    within a repeated eigenvalue), orthonormal, with a small residual, on degenerate spectra too."""
    r, k = 80, 30
    rng = np.random.default_rng(4)
    q = np.linalg.qr(rng.standard_normal((r, r)))[0]
    G = {"random": spd(r, seed=4), "identity": np.eye(r) * 3.0,
         "low rank": (lambda x: x @ x.T)(rng.standard_normal((r, 5))),
         "split": np.kron(np.eye(2), spd(r // 2, seed=5)),  # the same spectrum twice: every eigenvalue double
         "clustered": q @ np.diag(1 + 1e-12 * np.arange(r)) @ q.T,  # eigenvalues 1e-12 apart
         }[case]
    a = np.array(G, order="F")
    d, e, tau = lapack.sytrd(a)
    w = lapack.sterf(d, e)
    z = lapack.stein(d, e, w[r - k:])
    np.testing.assert_allclose(z.T @ z, np.eye(k), atol=1e-12)
    T = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    assert np.abs(T @ z - z * w[r - k:]).max() <= 1e-12 * max(w[-1], 1.0)
    zr = lapack.stemr(d, e, r - k + 1, r)
    # the same subspace where the spectrum separates it: all k (random; split, whose pairs k = 30 does not cut),
    # the top 5 of a rank-5 matrix (the other 25 are any orthonormal null vectors)
    top = {"random": k, "split": k, "low rank": 5}.get(case)
    if top:
        np.testing.assert_allclose(z[:, k - top:] @ z[:, k - top:].T, zr[:, k - top:] @ zr[:, k - top:].T, atol=1e-9)


def test_syevd_matches_numpy():
    G = spd(40, seed=2)
    w, v = lapack.syevd(np.array(G, order="F"))
    w0 = np.linalg.eigvalsh(G)
    np.testing.assert_allclose(w, w0, rtol=0, atol=1e-12 * w0[-1])
    np.testing.assert_allclose(v @ np.diag(w) @ v.T, G, atol=1e-10 * w0[-1])


def test_syevr_matches_numpy():
    G = spd(40, seed=4)
    w, v = lapack.syevr(np.array(G, order="F"))
    w0 = np.linalg.eigvalsh(G)
    np.testing.assert_allclose(w, w0, rtol=0, atol=1e-12 * w0[-1])
    np.testing.assert_allclose(v.T @ v, np.eye(40), atol=1e-12)
    np.testing.assert_allclose(v @ np.diag(w) @ v.T, G, atol=1e-10 * w0[-1])


def test_syrk_add_accumulates_the_upper_triangle():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((9, 5)), rng.standard_normal((9, 7))
    c = np.zeros((9, 9), order="F")
    lapack.syrk_add(c, a)
    lapack.syrk_add(c, b)  # a C-ordered input is accepted (copied); c is written in place
    want = a @ a.T + b @ b.T
    np.testing.assert_allclose(np.triu(c), np.triu(want), atol=1e-12)
    assert not np.tril(c, -1).any()


def test_failures_and_misuse_are_refused():
    with pytest.raises(ValueError, match="column-major"):
        lapack.sytrd(spd(4))  # C order: LAPACK would read the transpose's storage and write a copy nobody sees
    with pytest.raises(torch.linalg.LinAlgError, match="dstemr"):
        lapack.stemr(np.array([1.0, np.nan, 2.0]), np.array([0.5, 0.5]), 1, 3)


def test_the_gil_is_released_during_a_call():
    """While one thread tridiagonalises, another keeps running Python: scipy's own wrapper would stop it."""
    G = spd(1500)
    t0 = time.perf_counter()
    lapack.sytrd(np.array(G, order="F"))
    alone = time.perf_counter() - t0
    ticks, done = [], threading.Event()

    def call():
        for _ in range(3):
            lapack.sytrd(np.array(G, order="F"))
        done.set()

    t = threading.Thread(target=call)
    t.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    t.join()
    gaps = np.diff(ticks)
    assert len(ticks) > 10 and gaps.max() < max(0.5 * alone, 0.05), (alone, gaps.max())


def test_the_kernels_load_without_the_rest_of_scipy_linalg():
    # a fresh process: geometry's LAPACK comes without scipy.linalg's 260 other modules; a later import of
    # scipy.linalg takes the same Cython modules (loading one twice would fail) and works
    import subprocess
    import sys

    code = ("import sys, numpy as np; from geometry import lapack\n"
            "assert 'scipy.linalg' not in sys.modules and 'scipy.linalg.cython_lapack' in sys.modules\n"
            "a = np.asfortranarray(np.diag([3.0, 1.0, 2.0])); d, e, tau = lapack.sytrd(a)\n"
            "import scipy.linalg\n"
            "from scipy.linalg import cython_blas, cython_lapack\n"
            "assert cython_lapack is lapack.cython_lapack and cython_blas is lapack.cython_blas\n"
            "import scipy.linalg.cython_lapack as again; assert again is lapack.cython_lapack\n"
            "assert np.allclose(scipy.linalg.eigh(np.diag([3.0, 1.0, 2.0]))[0], [1, 2, 3])\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
