"""Decompositions and subspace comparisons against plain float64 scipy references: the exact path,
each fast path on the same matrices, the checks that send a fast path back to the exact one, and the
identities of Sim_K (SPEC items 2, 3, 7; "every randomized method is tested against the exact SVD")."""

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from geometry import linalg
from geometry.linalg import (
    SymEig,
    all_eigenpairs,
    degrees,
    exact_svd,
    factored_svd,
    gram,
    gram_svd,
    gram_top,
    principal_angles,
    randomized_svd,
    short_product,
    singular_values,
    spectrum,
    subspace_sim,
    sym_eig,
)


def _orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0]  # (m, k)


def _planted(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """A matrix with singular values s (len min(m, n)) and Haar-random singular vectors."""
    r = min(m, n)
    return (_orthonormal(rng, m, r) * s) @ _orthonormal(rng, n, r).T  # (m, n)


def _max_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (radians) by scipy, the independent reference."""
    return float(sl.subspace_angles(A.double().numpy(), B.double().numpy()).max())


# --- exact_svd ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 24, 40)])
def test_exact_svd_matches_scipy_per_matrix(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # float32 input
    res = exact_svd(x, k=5)
    assert res.method == "exact" and res.S.dtype == torch.float64
    assert res.U.shape == (*shape[:-1], 5) and res.V.shape == (shape[0], shape[2], 5)
    for i in range(shape[0]):
        ref_U, ref_S, ref_Vh = sl.svd(x[i].double().numpy(), full_matrices=False)
        np.testing.assert_allclose(res.S[i].numpy(), ref_S, rtol=1e-12)
        assert _max_angle(res.U[i], torch.tensor(ref_U[:, :5])) < 1e-10
        assert _max_angle(res.V[i], torch.tensor(ref_Vh[:5].T)) < 1e-10


# --- gram_svd ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 60, 40), (3, 40, 60), (2, 50, 50)])
def test_gram_svd_matches_exact(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = 7
    fast, ref = gram_svd(x, k), exact_svd(x, k)
    assert fast.method == "gram"
    np.testing.assert_allclose(fast.S.numpy(), ref.S.numpy(), rtol=1e-10)
    eye = torch.eye(k, dtype=torch.float64)
    for i in range(shape[0]):
        torch.testing.assert_close(fast.U[i].mT @ fast.U[i], eye, atol=1e-10, rtol=0)
        torch.testing.assert_close(fast.V[i].mT @ fast.V[i], eye, atol=1e-10, rtol=0)
        assert _max_angle(fast.U[i], ref.U[i]) < 1e-8
        assert _max_angle(fast.V[i], ref.V[i]) < 1e-8


def test_gram_svd_full_reconstructs_the_matrix():
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = gram_svd(x)
    torch.testing.assert_close((res.U * res.S) @ res.V.mT, x, atol=1e-10, rtol=0)


def test_gram_svd_batched_equals_per_matrix():
    x = torch.randn(3, 36, 28, generator=torch.Generator().manual_seed(3))
    batched = gram_svd(x, 5)
    for i in range(3):
        single = gram_svd(x[i], 5)
        torch.testing.assert_close(batched.S[i], single.S, rtol=1e-12, atol=0)
        assert _max_angle(batched.U[i], single.U) < 1e-9


def test_gram_svd_falls_back_on_rank_deficient_matrix():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30)))  # rank 3 of 30
    res, ref = gram_svd(x, 3), exact_svd(x, 3)
    assert res.method == "gram->exact"
    torch.testing.assert_close(res.S, ref.S)
    torch.testing.assert_close(res.U, ref.U)


def test_gram_svd_falls_back_on_ill_conditioned_matrix():
    rng = np.random.default_rng(5)
    s = np.geomspace(1.0, 1e-9, 30)  # condition 1e9, beyond what a Gram matrix resolves
    x = torch.tensor(_planted(rng, 40, 30, s))
    res = gram_svd(x)
    assert res.method == "gram->exact"
    np.testing.assert_allclose(res.S.numpy(), sl.svdvals(x.numpy()), rtol=1e-6)


def test_gram_svd_keeps_fast_path_on_moderate_condition():
    rng = np.random.default_rng(6)
    x = torch.tensor(_planted(rng, 40, 30, np.geomspace(1.0, 1e-4, 30)))
    res = gram_svd(x)
    assert res.method == "gram"
    # Gram squares the condition number: relative error ~ eps64 * (s1 / s_i)^2 ~ 1e-8 on the smallest value
    np.testing.assert_allclose(res.S.numpy(), sl.svdvals(x.numpy()), rtol=1e-6)


# --- spectrum ----------------------------------------------------------------------------------

@pytest.mark.parametrize("small_values", [True, False])
def test_spectrum_matches_scipy_on_well_conditioned_batch(small_values):
    x = torch.randn(3, 50, 35, generator=torch.Generator().manual_seed(7))
    s = spectrum(x, small_values=small_values)
    assert s.shape == (3, 35) and s.dtype == torch.float64
    for i in range(3):
        np.testing.assert_allclose(s[i].numpy(), sl.svdvals(x[i].double().numpy()), rtol=1e-10)


def test_spectrum_small_values_are_exact_on_ill_conditioned_matrix():
    rng = np.random.default_rng(8)
    s_true = np.geomspace(1.0, 1e-10, 25)
    x = torch.tensor(_planted(rng, 30, 25, s_true))
    ref = sl.svdvals(x.numpy())
    # small_values=True: every value to high relative accuracy, the smallest included
    np.testing.assert_allclose(spectrum(x, small_values=True).numpy(), ref, rtol=1e-5)
    # small_values=False: the Gram floor ~ sqrt(eps64) * s1 blurs the small values only
    loose = spectrum(x, small_values=False).numpy()
    np.testing.assert_allclose(loose, ref, rtol=0, atol=1e-7 * ref[0])
    np.testing.assert_allclose(loose[:5], ref[:5], rtol=1e-10)
    assert abs(loose[-1] - ref[-1]) / ref[-1] > 0.5  # shows the fast path really skipped the exact one


def test_spectrum_small_values_false_keeps_top_of_low_rank_matrix():
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.standard_normal((60, 5)) @ rng.standard_normal((5, 45)))  # exactly rank 5
    ref = sl.svdvals(x.numpy())
    fast = spectrum(x, small_values=False).numpy()
    np.testing.assert_allclose(fast[:5], ref[:5], rtol=1e-10)
    assert fast[5:].max() < 1e-6 * ref[0]


# --- randomized_svd ----------------------------------------------------------------------------

def _decaying_batch(seed: int, L: int, m: int, n: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    s = 0.8 ** np.arange(min(m, n))  # steady decay: a clear gap after any K
    return torch.tensor(np.stack([_planted(rng, m, n, s) for _ in range(L)]))  # (L, m, n)


@pytest.mark.parametrize("shape", [(80, 60), (60, 80)])
def test_randomized_svd_matches_exact_on_decaying_spectrum(shape):
    x = _decaying_batch(10, 3, *shape)
    K = 8
    check = spectrum(x)
    res, ref = randomized_svd(x, K, seed=0, check=check), exact_svd(x, K)
    assert res.method == "randomized"
    torch.testing.assert_close(res.S, check)  # the checked result reports the exact spectrum
    assert (subspace_sim(res.U, ref.U) >= 0.99).all()
    assert (subspace_sim(res.V, ref.V) >= 0.99).all()
    unchecked = randomized_svd(x, K, seed=0)
    assert unchecked.S.shape == (3, K)
    np.testing.assert_allclose(unchecked.S.numpy(), ref.S[:, :K].numpy(), rtol=1e-6)


def test_randomized_svd_falls_back_on_flat_spectrum():
    # A Gaussian matrix: its top singular values crowd together, so 4 power iterations miss them by ~1%
    x = torch.randn(2, 90, 70, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    K = 16
    res, ref = randomized_svd(x, K, seed=0, check=spectrum(x)), exact_svd(x, K)
    assert res.method == "randomized->exact"
    torch.testing.assert_close(res.U, ref.U)
    torch.testing.assert_close(res.V, ref.V)


def test_randomized_svd_is_seeded():
    x = _decaying_batch(12, 2, 50, 40)
    a, b = randomized_svd(x, 6, seed=3), randomized_svd(x, 6, seed=3)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    c = randomized_svd(x, 6, seed=4)
    assert not torch.equal(a.U, c.U)
    assert (subspace_sim(a.U, c.U) >= 0.99).all()  # another seed, the same answer


# --- gram and sym_eig (the CPU kernels under every Gram path) ---------------------------------

@pytest.mark.parametrize("shape", [(70, 40), (40, 70), (30, 30)])
def test_gram_is_the_smaller_sides_gram_matrix_exactly_symmetric(shape):
    x = torch.tensor(np.random.default_rng(30).standard_normal((2, 3, *shape)))  # two leading dimensions
    G = gram(x)
    want = x.mT @ x if shape[0] >= shape[1] else x @ x.mT
    assert G.shape == want.shape and torch.equal(G, G.mT)
    torch.testing.assert_close(G, want, rtol=1e-13, atol=1e-12)


# k = 0: values only; 5 and 20 of 64: the tridiagonal path; 40: above FULL_EIGH_SHARE, a full eigh; 99 > r
@pytest.mark.parametrize("k", [0, 1, 5, 20, 40, 64, 99])
def test_sym_eig_matches_scipy_eigh(k):
    rng = np.random.default_rng(31)
    x = rng.standard_normal((3, 90, 64)) * np.linspace(2, 0.1, 64)
    G = torch.tensor(x).mT @ torch.tensor(x)
    vals, vecs = sym_eig(G, k)
    for i in range(3):
        w, v = sl.eigh(G[i].numpy())
        np.testing.assert_allclose(vals[i].numpy(), w[::-1], rtol=0, atol=1e-12 * w[-1])
        if k == 0:
            assert vecs is None
            continue
        kk = min(k, 64)
        assert vecs.shape == (3, 64, kk)
        ref = torch.tensor(v[:, ::-1][:, :kk].copy())
        # eigenvectors up to sign: |<v_i, ref_i>| = 1 (the spectrum has no repeated values)
        np.testing.assert_allclose((vecs[i] * ref).sum(0).abs().numpy(), 1.0, atol=1e-10)


def test_sym_eig_may_overwrite_its_input_with_the_same_result():
    rng = np.random.default_rng(33)
    x = torch.tensor(rng.standard_normal((2, 90, 64)))
    G = gram(x)
    want = sym_eig(G.clone(), 10)
    got = sym_eig(G, 10, overwrite=True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert not torch.equal(G, gram(x))  # LAPACK worked in G's storage: no copy of it was made


@pytest.mark.parametrize("overwrite", [False, True])
def test_sym_eig_object_gives_values_then_any_top_vectors_from_one_solve(overwrite):
    rng = np.random.default_rng(34)
    x = torch.tensor(rng.standard_normal((2, 80, 50)) * np.linspace(3, 0.2, 50))
    G = gram(x)
    w_ref, v_ref = (torch.tensor(a.copy()) for a in np.linalg.eigh(G.numpy()))
    eig = SymEig(G, overwrite=overwrite)
    torch.testing.assert_close(eig.values, w_ref.flip(-1), rtol=0, atol=1e-12 * w_ref.max().item())
    for k in (3, 20, 50):  # after G may be gone: the kept tridiagonalisation is enough
        v = eig.top(k)
        np.testing.assert_allclose((v * v_ref.flip(-1)[..., :k]).sum(-2).abs().numpy(), 1.0, atol=1e-10)


def test_gram_top_solves_each_eigenproblem_once(monkeypatch):
    # a flat spectrum: the iteration cannot win, so gram_top takes eigenvectors from the solve it already made
    import geometry.linalg as linalg

    calls = []
    real = linalg._tridiagonal
    monkeypatch.setattr(linalg, "_tridiagonal", lambda g, overwrite: calls.append(1) or real(g, overwrite))
    x = torch.tensor(np.random.default_rng(35).standard_normal((3, 120, 100)))
    res = gram_top(x, 8)
    assert res.method == "gram" and len(calls) == 3
    ref = exact_svd(x, 8)
    assert (1 - subspace_sim(res.V, ref.V) < 1e-10).all()


def test_sym_eig_refuses_a_matrix_with_nan():
    G = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1)
    G[1, 0, 0] = math.nan
    with pytest.raises(torch.linalg.LinAlgError):
        sym_eig(G, 2)


def test_singular_values_zero_the_unresolved_tail_of_a_low_rank_matrix():
    rng = np.random.default_rng(32)
    x = torch.tensor(rng.standard_normal((80, 5)) @ rng.standard_normal((5, 60)))  # rank 5
    S = singular_values(sym_eig(gram(x))[0], resolved_only=True)
    np.testing.assert_allclose(S[:5].numpy(), sl.svdvals(x.numpy())[:5], rtol=1e-12)
    assert (S[5:] == 0).all()  # the exact tail, not sqrt of rounding noise
    raw = singular_values(sym_eig(gram(x))[0])
    torch.testing.assert_close(raw[:5], S[:5], rtol=0, atol=0)


# --- gram_top (certified subspace iteration) --------------------------------------------------

@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_gram_top_matches_exact_to_its_certificate(shape):
    x = _decaying_batch(13, 3, *shape)
    K = 6
    res, ref = gram_top(x, K, tol=1e-9, iterate=True), exact_svd(x, K)  # the GPU's path, on the CPU
    assert res.method == "subspace"
    np.testing.assert_allclose(res.S[:, :K].numpy(), ref.S[:, :K].numpy(), rtol=1e-10)
    assert ((res.S - ref.S).abs() <= 1e-7 * ref.S[:, :1]).all()  # the small values: to ~sqrt(eps) of s1
    for got, want in ((res.U, ref.U), (res.V, ref.V)):
        # Davis-Kahan: ||sin Theta||_F <= 1e-9, so Sim_K = 1 - ||sin Theta||_F^2 / K to ~1e-18
        assert (1 - subspace_sim(got, want) < 1e-12).all()
        assert max(_max_angle(got[i], want[i]) for i in range(3)) < 1e-8
    warm = gram_top(x, K, warm=ref.V if shape[0] >= shape[1] else ref.U, tol=1e-9, iterate=True)
    assert warm.method == "subspace" and (1 - subspace_sim(warm.V, ref.V) < 1e-12).all()


def test_gram_top_falls_back_without_a_gap():
    # a repeated singular value at the K / K+1 boundary: no top-K subspace to certify, so eigh decides
    rng = np.random.default_rng(14)
    s = np.r_[np.linspace(3, 2, 5), [1.0, 1.0], 0.5 ** np.arange(33)]
    x = torch.tensor(_planted(rng, 60, 40, s))[None]
    res = gram_top(x, 6)
    assert res.method == "subspace->gram"
    torch.testing.assert_close(res.S, gram_svd(x, 6, small_values=False).S)


# --- principal angles --------------------------------------------------------------------------

@pytest.mark.parametrize("ka, kb", [(6, 6), (3, 5), (5, 3)])
def test_principal_angles_match_scipy(ka, kb):
    rng = np.random.default_rng(13)
    A = np.stack([_orthonormal(rng, 30, ka) for _ in range(3)])
    B = np.stack([_orthonormal(rng, 30, kb) for _ in range(3)])
    got = principal_angles(torch.tensor(A), torch.tensor(B))
    assert got.shape == (3, min(ka, kb))
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), np.sort(sl.subspace_angles(A[i], B[i])), atol=1e-12)


@pytest.mark.parametrize("ka, kb", [(4, 4), (2, 4), (4, 2)])
def test_principal_angles_recover_planted_small_angles(ka, kb):
    # span(A) and span(B) share a basis except for Givens rotations by planted angles into fresh directions
    rng = np.random.default_rng(14)
    Q = _orthonormal(rng, 40, 12)
    planted = np.array([1e-7, 1e-5, 1e-3, 0.3])
    k = min(ka, kb)
    A = Q[:, :ka]
    B = Q[:, :kb].copy()
    for i in range(k):
        B[:, i] = math.cos(planted[i]) * Q[:, i] + math.sin(planted[i]) * Q[:, 8 + i]
    got = principal_angles(torch.tensor(A), torch.tensor(B)).numpy()
    np.testing.assert_allclose(got, np.sort(planted[:k]), rtol=1e-6)


def test_principal_angles_of_identical_subspaces_are_zero():
    rng = np.random.default_rng(15)
    A = _orthonormal(rng, 30, 5)
    R = _orthonormal(rng, 5, 5)  # another basis of the same span
    got = principal_angles(torch.tensor(A), torch.tensor(A @ R))
    assert got.abs().max() < 1e-7


def test_degrees():
    torch.testing.assert_close(degrees(torch.tensor([math.pi, math.pi / 180])), torch.tensor([180.0, 1.0]))


# --- Sim_K -------------------------------------------------------------------------------------

def test_subspace_sim_identities():
    rng = np.random.default_rng(16)
    A, B = (torch.tensor(_orthonormal(rng, 40, 6)) for _ in range(2))
    R = torch.tensor(_orthonormal(rng, 6, 6))
    torch.testing.assert_close(subspace_sim(A, A), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(subspace_sim(A, B), subspace_sim(B, A))
    torch.testing.assert_close(subspace_sim(A @ R, B), subspace_sim(A, B))  # a property of the spans
    assert 0.0 <= subspace_sim(A, B) <= 1.0
    # Sim_K = mean cos^2 of the principal angles
    cos2 = np.cos(sl.subspace_angles(A.numpy(), B.numpy())) ** 2
    assert subspace_sim(A, B).item() == pytest.approx(cos2.mean(), rel=1e-10)


def test_subspace_sim_of_orthogonal_subspaces_is_zero():
    Q = torch.linalg.qr(torch.randn(30, 8, generator=torch.Generator().manual_seed(17)))[0]
    assert subspace_sim(Q[:, :4], Q[:, 4:]).item() == pytest.approx(0.0, abs=1e-14)


def test_subspace_sim_random_baseline_is_K_over_n():
    n, K, trials = 48, 4, 400
    gen = torch.Generator().manual_seed(18)
    A = torch.linalg.qr(torch.randn(trials, n, K, generator=gen, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(trials, n, K, generator=gen, dtype=torch.float64))[0]
    sims = subspace_sim(A, B)  # (trials,)
    stderr = sims.std() / math.sqrt(trials)
    assert abs(sims.mean() - K / n) < 4 * stderr


def test_factored_svd_of_a_low_rank_product_equals_the_exact_svd():
    """x = L R of rank 5 (a LoRA update): the SVD from the factors' QR equals LAPACK's on the dense product."""
    gen = torch.Generator().manual_seed(11)
    L = torch.randn(3, 40, 5, generator=gen, dtype=torch.float64)
    R = torch.randn(3, 5, 30, generator=gen, dtype=torch.float64)
    got, ref = factored_svd(L, R, 4), exact_svd(L @ R, 4)
    assert got.method == "factored" and got.S.shape == (3, 30) and got.U.shape == (3, 40, 4)
    torch.testing.assert_close(got.S, ref.S, rtol=1e-10, atol=1e-10)  # zeros past the rank, too
    assert torch.all(subspace_sim(got.U, ref.U) > 1 - 1e-10) and torch.all(subspace_sim(got.V, ref.V) > 1 - 1e-10)
    torch.testing.assert_close(got.U.mT @ got.U, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_short_product_a_band_at_a_time_matches_the_dense_product(monkeypatch, shape, dtype):
    monkeypatch.setattr(linalg, "BLOCK_BYTES", 0)
    monkeypatch.setattr(linalg, "BLOCK_ROWS", 7)  # bands of 7 rows of the long side, the last one short
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, generator=g).to(dtype)
    Y = torch.randn(2, max(shape), 4, generator=g, dtype=torch.float64)
    x64 = x.double().numpy()
    want = np.stack([(a.T if a.shape[0] >= a.shape[1] else a) @ y for a, y in zip(x64, Y.numpy(), strict=True)])
    np.testing.assert_allclose(short_product(x, Y).numpy(), want, rtol=1e-12, atol=1e-12)


def test_all_eigenpairs_decompose_the_matrix_in_its_own_place():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((40, 30))
    G = A.T @ A
    G[:, :3] = G[:3, :] = 0.0  # a null space three deep: MRRR's vectors still orthonormal
    G[3:, 3:] = (A[:, 3:].T @ A[:, 3:])
    w, V = all_eigenpairs(torch.tensor(G))
    np.testing.assert_allclose(np.sort(w.numpy()), np.linalg.eigvalsh(G), rtol=0, atol=1e-12 * np.abs(G).max())
    np.testing.assert_allclose(V.numpy().T @ V.numpy(), np.eye(30), atol=1e-12)
    np.testing.assert_allclose((V.numpy() * w.numpy()) @ V.numpy().T, G, atol=1e-11 * np.abs(G).max())
    with pytest.raises(torch.linalg.LinAlgError):
        all_eigenpairs(torch.full((3, 3), math.nan, dtype=torch.float64))
