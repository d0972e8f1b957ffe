"""The offline engine on a CUDA device against the same computation on the CPU (``pytest -m cuda``;
benchmarks/gpu.sh runs these). Skipped where torch sees no CUDA device."""

import math

import numpy as np
import pytest
import torch
from planted import top_of

from geometry import metrics as M
from geometry.linalg import exact_svd
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, locking_sims, measure_step
from geometry.subspaces import subspace_sim

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _stack(seed: int, L: int, m: int, n: int):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(L, m, n, generator=g) / math.sqrt(n)
    low = torch.randn(L, m, 8, generator=g) @ torch.randn(L, 8, n, generator=g)
    Ws = W0 + 1e-3 * low + 1e-4 * torch.randn(L, m, n, generator=g)
    Wt = W0 + 2e-3 * low + 2e-4 * torch.randn(L, m, n, generator=g)
    return W0, Ws, Wt


@pytest.mark.parametrize("m, n", [(96, 64), (64, 96)])
def test_measure_step_on_cuda_matches_cpu(m, n):
    cfg = AnalysisConfig(principal_k=8, lock_k=4, mask_rank=4)
    W0, Ws, Wt = _stack(0, 3, m, n)
    out = {}
    for dev in ("cpu", "cuda"):
        base = decompose_base(W0.to(dev), cfg)
        steps = [measure_step(base, Ws.to(dev), W0.to(dev), cfg), measure_step(base, Wt.to(dev), Ws.to(dev), cfg)]
        out[dev] = (steps, locking_sims(steps))
    for (a, b) in zip(out["cpu"][0], out["cuda"][0], strict=True):
        for name, value in a.values.items():
            np.testing.assert_allclose(b.values[name].cpu().numpy(), value.numpy(), rtol=1e-7, atol=1e-9,
                                       err_msg=name)
    for a, b in zip(out["cpu"][1], out["cuda"][1], strict=True):
        for name, value in a.items():
            np.testing.assert_allclose(b[name].cpu().numpy(), value.numpy(), atol=1e-6, err_msg=name)


def test_top_from_gram_on_cuda_matches_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 200, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 200, dtype=torch.float64)
    res, ref = top_of(x.cuda(), 8, tol=1e-9), exact_svd(x, 8)
    assert res.method in ("subspace", "gram")
    assert (1 - subspace_sim(res.V.cpu(), ref.V) < 1e-12).all()


def test_mask_selection_on_cuda_equals_the_sort():
    g = torch.Generator().manual_seed(2)
    W0 = (torch.randint(-6, 7, (3, 40, 30), generator=g) * 0.125).float()
    for alpha in (0.3, 0.5):
        count = math.ceil(alpha * 1200 * (1 - 1e-12))
        np.testing.assert_array_equal(M.lowmag_mask(W0.cuda(), alpha).cpu().numpy(),
                                      M._top_fraction_sorted(-W0.abs(), count).numpy())


@pytest.mark.parametrize("m, n", [(96, 64), (64, 96)])
def test_quick_suite_on_cuda_matches_cpu(m, n, monkeypatch):
    # the blocked update (several blocks) and SymEig's CUDA branch, against the same on the CPU
    import geometry.kernels as kernels

    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 10)
    cfg = AnalysisConfig(principal_k=8, lock_k=4, mask_rank=4, quick=True)
    W0, _, Wt = _stack(3, 3, m, n)
    res = {dev: measure_step(decompose_base(W0.to(dev), cfg), Wt.to(dev), W0.to(dev), cfg) for dev in ("cpu", "cuda")}
    for name, value in res["cpu"].values.items():
        np.testing.assert_allclose(res["cuda"].values[name].cpu().numpy(), value.numpy(), rtol=1e-7, atol=1e-9,
                                   err_msg=name)
    assert (1 - subspace_sim(res["cuda"].VK.cpu(), res["cpu"].VK) < 1e-10).all()
