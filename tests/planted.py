"""Matrices with planted spectra and subspaces, and the independent references the decomposition tests use."""

import numpy as np
import scipy.linalg as sl
import torch

from geometry.kernels import gram, long_product
from geometry.linalg import SVD, top_from_gram


def orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0]  # (m, k)


def planted(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """A matrix with singular values s (len min(m, n)) and Haar-random singular vectors."""
    r = min(m, n)
    return (orthonormal(rng, m, r) * s) @ orthonormal(rng, n, r).T  # (m, n)


def decaying_batch(seed: int, L: int, m: int, n: int) -> torch.Tensor:
    """(L, m, n) float64, singular values 0.8^i: a clear gap after any K."""
    rng = np.random.default_rng(seed)
    s = 0.8 ** np.arange(min(m, n))
    return torch.tensor(np.stack([planted(rng, m, n, s) for _ in range(L)]))


def max_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (radians) by scipy, the independent reference."""
    return float(sl.subspace_angles(A.double().numpy(), B.double().numpy()).max())


def top_of(x: torch.Tensor, k: int, **options) -> SVD:
    """``linalg.top_from_gram`` on a whole matrix x: its Gram matrix, its long side's products and x itself
    for the exact fallback, as the engine's blocked update gives them (offline.engine._decompose_update)."""
    m, n = x.shape[-2:]
    return top_from_gram(gram(x), k, lambda X: long_product(x, X), lambda: x.double(), tall=m >= n, **options)
