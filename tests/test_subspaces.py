"""Principal angles and Sim_K against scipy's subspace_angles, planted angles, and their identities (SPEC items
2 and 7)."""

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from planted import orthonormal

from geometry.subspaces import degrees, principal_angles, subspace_sim

# --- principal angles --------------------------------------------------------------------------

@pytest.mark.parametrize("ka, kb", [(6, 6), (3, 5), (5, 3)])
def test_principal_angles_match_scipy(ka, kb):
    rng = np.random.default_rng(13)
    A = np.stack([orthonormal(rng, 30, ka) for _ in range(3)])
    B = np.stack([orthonormal(rng, 30, kb) for _ in range(3)])
    got = principal_angles(torch.tensor(A), torch.tensor(B))
    assert got.shape == (3, min(ka, kb))
    for i in range(3):
        np.testing.assert_allclose(got[i].numpy(), np.sort(sl.subspace_angles(A[i], B[i])), atol=1e-12)


@pytest.mark.parametrize("ka, kb", [(4, 4), (2, 4), (4, 2)])
def test_principal_angles_recover_planted_small_angles(ka, kb):
    # span(A) and span(B) share a basis except for Givens rotations by planted angles into fresh directions
    rng = np.random.default_rng(14)
    Q = orthonormal(rng, 40, 12)
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
    A = orthonormal(rng, 30, 5)
    R = orthonormal(rng, 5, 5)  # another basis of the same span
    got = principal_angles(torch.tensor(A), torch.tensor(A @ R))
    assert got.abs().max() < 1e-7


def test_degrees():
    torch.testing.assert_close(degrees(torch.tensor([math.pi, math.pi / 180])), torch.tensor([180.0, 1.0]))


# --- Sim_K -------------------------------------------------------------------------------------

def test_subspace_sim_identities():
    rng = np.random.default_rng(16)
    A, B = (torch.tensor(orthonormal(rng, 40, 6)) for _ in range(2))
    R = torch.tensor(orthonormal(rng, 6, 6))
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
