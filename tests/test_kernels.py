"""The float64 products under every decomposition against plain numpy: the Gram matrix of the smaller side,
exactly symmetric, and products a band of rows at a time equal to the dense ones."""

import numpy as np
import pytest
import torch

from geometry import kernels
from geometry.kernels import gram, short_product


@pytest.mark.parametrize("shape", [(70, 40), (40, 70), (30, 30)])
def test_gram_is_the_smaller_sides_gram_matrix_exactly_symmetric(shape):
    x = torch.tensor(np.random.default_rng(30).standard_normal((2, 3, *shape)))  # two leading dimensions
    G = gram(x)
    want = x.mT @ x if shape[0] >= shape[1] else x @ x.mT
    assert G.shape == want.shape and torch.equal(G, G.mT)
    torch.testing.assert_close(G, want, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_short_product_a_band_at_a_time_matches_the_dense_product(monkeypatch, shape, dtype):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)  # bands of 7 rows of the long side, the last one short
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, generator=g).to(dtype)
    Y = torch.randn(2, max(shape), 4, generator=g, dtype=torch.float64)
    x64 = x.double().numpy()
    want = np.stack([(a.T if a.shape[0] >= a.shape[1] else a) @ y for a, y in zip(x64, Y.numpy(), strict=True)])
    np.testing.assert_allclose(short_product(x, Y).numpy(), want, rtol=1e-12, atol=1e-12)
