"""The symmetric eigensolver against scipy's eigh: all eigenvalues, any top-k eigenvectors from one solve, the
LAPACK paths it chooses between, and the singular values Gram eigenvalues resolve."""

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from geometry.kernels import gram
from geometry.symeig import SymEig, all_eigenpairs, singular_values, sym_eig


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


def test_no_vectors_asked_gives_an_empty_basis():
    G = gram(torch.tensor(np.random.default_rng(36).standard_normal((2, 30, 20))))
    assert SymEig(G).top(0).shape == (2, 20, 0)


def test_vectors_come_from_mrrr_where_inverse_iteration_fails(monkeypatch):
    # LAPACK's dstein reports vectors that did not converge (info > 0, a LinAlgError): stemr gives them instead
    import geometry.symeig as symeig

    def fails(d, e, w):
        raise torch.linalg.LinAlgError("LAPACK dstein failed (info 1)")

    rng = np.random.default_rng(37)
    G = gram(torch.tensor(rng.standard_normal((2, 80, 50)) * np.linspace(3, 0.2, 50)))
    want = SymEig(G).top(8)
    monkeypatch.setattr(symeig.lapack, "stein", fails)
    got = SymEig(G).top(8)
    np.testing.assert_allclose((got * want).sum(-2).abs().numpy(), 1.0, atol=1e-10)  # the same vectors, up to sign


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
