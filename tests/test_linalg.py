"""The SVD paths against plain float64 scipy references: the exact path, each fast path on the same matrices,
the checks that send a fast path back to the exact one ("every randomized method is tested against the exact
SVD")."""

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from planted import decaying_batch, max_angle, planted, top_of

from geometry.kernels import gram
from geometry.linalg import exact_svd, factored_svd, gram_svd, randomized_svd, spectrum
from geometry.subspaces import subspace_sim

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
        assert max_angle(res.U[i], torch.tensor(ref_U[:, :5])) < 1e-10
        assert max_angle(res.V[i], torch.tensor(ref_Vh[:5].T)) < 1e-10


def test_exact_svd_keeps_every_vector_when_no_k_is_given():
    x = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = exact_svd(x)
    assert res.U.shape == (2, 30, 20) and res.V.shape == (2, 20, 20)
    torch.testing.assert_close((res.U * res.S[..., None, :]) @ res.V.mT, x, rtol=0, atol=1e-12)


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
        assert max_angle(fast.U[i], ref.U[i]) < 1e-8
        assert max_angle(fast.V[i], ref.V[i]) < 1e-8


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
        assert max_angle(batched.U[i], single.U) < 1e-9


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
    x = torch.tensor(planted(rng, 40, 30, s))
    res = gram_svd(x)
    assert res.method == "gram->exact"
    np.testing.assert_allclose(res.S.numpy(), sl.svdvals(x.numpy()), rtol=1e-6)


def test_gram_svd_keeps_fast_path_on_moderate_condition():
    rng = np.random.default_rng(6)
    x = torch.tensor(planted(rng, 40, 30, np.geomspace(1.0, 1e-4, 30)))
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
    x = torch.tensor(planted(rng, 30, 25, s_true))
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

@pytest.mark.parametrize("shape", [(80, 60), (60, 80)])
def test_randomized_svd_matches_exact_on_decaying_spectrum(shape):
    x = decaying_batch(10, 3, *shape)
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
    x = decaying_batch(12, 2, 50, 40)
    a, b = randomized_svd(x, 6, seed=3), randomized_svd(x, 6, seed=3)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    c = randomized_svd(x, 6, seed=4)
    assert not torch.equal(a.U, c.U)
    assert (subspace_sim(a.U, c.U) >= 0.99).all()  # another seed, the same answer


def test_randomized_svd_falls_back_where_its_products_overflow():
    # entries of 1e307: x times the Gaussian start overflows, and LAPACK refuses the non-finite block
    x = torch.randn(2, 90, 70, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 1e307
    res, ref = randomized_svd(x, 4, seed=0), exact_svd(x, 4)
    assert res.method == "randomized->exact"
    torch.testing.assert_close(res.S, ref.S, rtol=0, atol=0)
    torch.testing.assert_close(res.V, ref.V, rtol=0, atol=0)


def test_randomized_svd_falls_back_when_its_values_are_not_finite():
    # one row of sixteen entries of 1e308, no power steps: every product the iteration forms stays finite (seed 1
    # draws a start whose entries sum to 0.5), but s1 = 4e308 does not; LAPACK returns it as inf without raising
    x = torch.full((1, 16), 1e308, dtype=torch.float64)
    res = randomized_svd(x, 1, n_iter=0, seed=1)
    assert res.method == "randomized->exact"
    assert torch.equal(res.S, exact_svd(x, 1).S) and res.S[0] == torch.inf


# --- a Gram matrix beyond float64's range: the exact SVD ---------------------------------------

@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_a_matrix_whose_gram_matrix_overflows_takes_the_exact_svd(shape):
    # entries of 1e160: their squares, the Gram matrix's entries, overflow; the SVD of the matrix itself does not
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 1e160
    ref = exact_svd(x, 5)
    with np.errstate(over="ignore", invalid="ignore"):  # numpy's syrk warns of the inf (and inf - inf)
        assert torch.isinf(gram(x)).any()
        fast, top = gram_svd(x, 5), top_of(x, 5)
        values = {small: spectrum(x, small_values=small) for small in (True, False)}
    assert fast.method == "gram->exact" and top.method == "subspace->exact"
    for res in (fast, top):
        torch.testing.assert_close(res.S, ref.S, rtol=0, atol=0)
        torch.testing.assert_close(res.U, ref.U, rtol=0, atol=0)
    for S in values.values():
        np.testing.assert_allclose(S.numpy(), ref.S.numpy(), rtol=1e-13)


def test_gram_eigenvalues_that_overflow_send_gram_svd_to_the_exact_svd():
    # x^T x = [[a, -a], [-a, a]], a = 1e308: finite, summing to 0, but its eigenvalue 2a is not
    s = (0.5e308) ** 0.5
    x = torch.tensor([[s, -s], [s, -s]], dtype=torch.float64)
    assert torch.isfinite(gram(x)).all()
    res = gram_svd(x)
    assert res.method == "gram->exact"
    np.testing.assert_allclose(res.S.numpy(), [2 * s, 0.0], rtol=1e-15, atol=0)


# --- top_from_gram (an update's top-k from its Gram matrix; certified subspace iteration) ----------

def test_top_from_gram_solves_each_eigenproblem_once(monkeypatch):
    # a flat spectrum: the iteration cannot win, so top_from_gram takes eigenvectors from the solve it already made
    import geometry.symeig as symeig

    calls = []
    real = symeig._tridiagonal
    monkeypatch.setattr(symeig, "_tridiagonal", lambda g, overwrite: calls.append(1) or real(g, overwrite))
    x = torch.tensor(np.random.default_rng(35).standard_normal((3, 120, 100)))
    res = top_of(x, 8)
    assert res.method == "gram" and len(calls) == 3
    ref = exact_svd(x, 8)
    assert (1 - subspace_sim(res.V, ref.V) < 1e-10).all()


def test_top_from_gram_falls_back_without_a_gap():
    # a repeated singular value at the K / K+1 boundary: no top-K subspace to certify, so eigh decides
    rng = np.random.default_rng(14)
    s = np.r_[np.linspace(3, 2, 5), [1.0, 1.0], 0.5 ** np.arange(33)]
    x = torch.tensor(planted(rng, 60, 40, s))[None]
    res = top_of(x, 6)
    assert res.method == "subspace->gram"
    torch.testing.assert_close(res.S, gram_svd(x, 6, small_values=False).S)


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
