"""How far apart two subspaces are: principal angles and Sim_K, batched, float64, for orthonormal bases."""

from __future__ import annotations

import math

import torch

from geometry.buffers import spare
from geometry.kernels import mm


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), orthonormal (..., m, k).

    Small angles come from sines, sigma(B - A A^T B), and large ones from cosines, sigma(A^T B)
    (Knyazev & Argentati 2002): arccos of a cosine near 1 loses every digit of a small angle.
    """
    A, B = A.double(), B.double()
    C = mm(A.mT, B)  # (..., k, k)
    cos = torch.linalg.svdvals(C).clamp(0, 1)  # descending -> angles ascending
    with spare() as scratch:  # B - A C formed in one buffer (m x k)
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


def degrees(radians: torch.Tensor) -> torch.Tensor:
    return radians * (180.0 / math.pi)
