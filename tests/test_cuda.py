"""The GPU plan (geometry.plan) against the CPU plan and the exact SVD on the same data, to the accuracy
docs/metrics.md states.

Each test runs twice: on the CPU within ``plan.gpu_plan()``, float64 CPU tensors taking every GPU branch (torch's
batched kernels, SymEig's eigvalsh and eigh, the certified subspace iteration and its fallbacks, the blocked update
and the masks on the device), on every machine; and on a CUDA device where torch sees one (``pytest -m cuda``
selects those; benchmarks/gpu.sh runs them)."""

import contextlib
import doctest
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from planted import decaying_batch, planted, top_of

from geometry import kernels, plan
from geometry import metrics as M
from geometry.linalg import exact_svd, gram_svd
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, locking_sims, measure_step
from geometry.subspaces import subspace_sim
from geometry.symeig import SymEig, all_eigenpairs, sym_eig


class GPU(NamedTuple):
    """Where the GPU plan runs: tensors moved to ``device``, the work done within ``plan()``."""

    device: str
    plan: Callable[[], contextlib.AbstractContextManager]


@pytest.fixture(params=["plan", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def gpu(request) -> GPU:
    return GPU("cpu", plan.gpu_plan) if request.param == "plan" else GPU("cuda", contextlib.nullcontext)


# docs/metrics.md's accuracy column: counts and masks exact; angles about 1e-7 relative; the NSS 1% relative;
# every other value float64, here 1e-9 relative (the two plans differ in the order of their sums and in their
# eigensolvers, both backward stable); Sim_K from subspaces certified to 1e-7, so within 1e-6
EXACT = {"n_params", "sparsity_bf16", "sparsity_abs", "mask_overlap_principal", "mask_overlap_lowmag",
         "mask_overlap_principal_ratio", "mask_overlap_lowmag_ratio", "r90", "r99", "r90_interval", "r99_interval",
         "intruders"}


def _tolerance(name: str) -> dict:
    if name in EXACT or name.startswith("sparsity_"):
        return {"rtol": 0, "atol": 0}
    if name.startswith("angle_"):
        return {"rtol": 1e-7, "atol": 0}
    if name == "nss":
        return {"rtol": 1e-2, "atol": 0}
    if name.startswith("sim_"):
        return {"rtol": 0, "atol": 1e-6}
    return {"rtol": 1e-9, "atol": 1e-15}


def _assert_values_agree(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].cpu().numpy(), value.numpy(), err_msg=name, **_tolerance(name))


def _stack(seed: int, L: int, m: int, n: int):
    """W0, W_s, W_t float32 (L, m, n): a rank-8 update and noise, a gap after K = 4."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(L, m, n, generator=g) / math.sqrt(n)
    low = torch.randn(L, m, 8, generator=g) @ torch.randn(L, 8, n, generator=g)
    Ws = W0 + 1e-3 * low + 1e-4 * torch.randn(L, m, n, generator=g)
    Wt = W0 + 2e-3 * low + 2e-4 * torch.randn(L, m, n, generator=g)
    return W0, Ws, Wt


def _steps(W0, Ws, Wt, cfg: AnalysisConfig, device: str):
    """Two checkpoints of a group measured on ``device``: the step results and their locking similarities."""
    W0, Ws, Wt = (w.to(device) for w in (W0, Ws, Wt))
    base = decompose_base(W0, cfg)
    first = measure_step(base, Ws, W0, cfg)
    steps = [first, measure_step(base, Wt, Ws, cfg, warm=first.VK if W0.shape[-2] >= W0.shape[-1] else first.UK)]
    return steps, locking_sims(steps)


def test_the_switch_holds_within_its_block_only():
    x = torch.zeros(2)
    with pytest.raises(RuntimeError), plan.gpu_plan():
        assert plan.gpu(x) and plan.gpu(x.device)
        raise RuntimeError
    assert not plan.gpu(x)
    assert doctest.testmod(plan).failed == 0


@pytest.mark.parametrize("m, n", [(96, 64), (64, 96)])
def test_the_full_suite_on_the_gpu_plan_matches_the_cpu_plan(gpu, m, n):
    # a batch of three same-shape matrices, two checkpoints (the second warm-started), the locking similarities
    cfg = AnalysisConfig(principal_k=8, lock_k=4, mask_rank=4)
    W0, Ws, Wt = _stack(0, 3, m, n)
    want, want_sims = _steps(W0, Ws, Wt, cfg, "cpu")
    with gpu.plan():
        got, got_sims = _steps(W0, Ws, Wt, cfg, gpu.device)
    for a, b in zip(want, got, strict=True):
        _assert_values_agree(b.values, a.values)
        np.testing.assert_allclose(b.spectrum.cpu().numpy(), a.spectrum.numpy(), rtol=1e-9)
        np.testing.assert_allclose(b.angles_u.cpu().numpy(), a.angles_u.numpy(), rtol=1e-7)
        assert (1 - subspace_sim(b.VK.cpu(), a.VK) < 1e-12).all()
        # the update's subspaces: certified subspace iteration on the GPU plan, the eigensolver's on the CPU plan
        assert a.methods[-1] == "gram" and b.methods[-1] == "subspace"
    for a, b in zip(want_sims, got_sims, strict=True):
        _assert_values_agree(b, a)


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("m, n", [(96, 64), (64, 96)])
def test_the_suites_in_bands_on_the_gpu_plan_match_the_cpu_plan(gpu, m, n, quick, monkeypatch):
    # bands of 10 rows: the blocked update's Gram matrices summed on the device, the masks' scores formed whole
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 10)
    cfg = AnalysisConfig(principal_k=8, lock_k=4, mask_rank=4, quick=quick)
    W0, Ws, Wt = _stack(3, 3, m, n)
    want, _ = _steps(W0, Ws, Wt, cfg, "cpu")
    with gpu.plan():
        got, _ = _steps(W0, Ws, Wt, cfg, gpu.device)
    for a, b in zip(want, got, strict=True):
        _assert_values_agree(b.values, a.values)
        assert (1 - subspace_sim(b.VK.cpu(), a.VK) < 1e-10).all()


@pytest.mark.parametrize("banded", [False, True])
def test_mask_selection_on_the_gpu_plan_equals_the_sort(gpu, banded, monkeypatch):
    if banded:  # several bands: the GPU plan selects over the whole score at once
        monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
        monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)
    g = torch.Generator().manual_seed(2)
    W0 = (torch.randint(-6, 7, (3, 40, 30), generator=g) * 0.125).float()  # many ties
    U, S, V, _ = exact_svd(torch.randn(3, 40, 30, generator=g, dtype=torch.float64))
    for alpha in (0.3, 0.5):
        count = math.ceil(alpha * 1200 * (1 - 1e-12))
        score = (U[..., :4] * S[..., None, :4]) @ V[..., :4].mT
        with gpu.plan():
            low = M.lowmag_mask(W0.to(gpu.device), alpha).cpu()
            principal = M.principal_mask(*(t.to(gpu.device) for t in (U, S, V)), 4, alpha).cpu()
        np.testing.assert_array_equal(low.numpy(), M._top_fraction_sorted(-W0.abs(), count).numpy())
        np.testing.assert_array_equal(principal.numpy(), M._top_fraction_sorted(score.abs(), count).numpy())


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_certified_subspaces_on_the_gpu_plan_match_the_exact_svd(gpu, shape):
    x = decaying_batch(13, 3, *shape)
    K = 6
    ref = exact_svd(x, K)
    warm_start = ref.V if shape[0] >= shape[1] else ref.U
    with gpu.plan():
        res = top_of(x.to(gpu.device), K, tol=1e-9)
        warm = top_of(x.to(gpu.device), K, warm=warm_start.to(gpu.device), tol=1e-9)
    assert res.method == warm.method == "subspace"
    np.testing.assert_allclose(res.S[:, :K].cpu().numpy(), ref.S[:, :K].numpy(), rtol=1e-10)
    assert ((res.S.cpu() - ref.S).abs() <= 1e-7 * ref.S[:, :1]).all()  # the small values: to ~sqrt(eps) of s1
    for got, want in ((res.U, ref.U), (res.V, ref.V), (warm.V, ref.V)):
        # Davis-Kahan: ||sin Theta||_F <= 1e-9, so Sim_K = 1 - ||sin Theta||_F^2 / K to ~1e-18
        assert (1 - subspace_sim(got.cpu(), want) < 1e-12).all()
        assert max(float(sl.subspace_angles(got[i].cpu().numpy(), want[i].numpy()).max()) for i in range(3)) < 1e-8


def test_certified_subspaces_fall_back_where_they_cannot_be_certified(gpu):
    rng = np.random.default_rng(14)
    # a repeated singular value at the K / K+1 boundary: no top-K subspace to certify, the eigensolver's vectors
    tied = torch.tensor(planted(rng, 60, 40, np.r_[np.linspace(3, 2, 5), [1.0, 1.0], 0.5 ** np.arange(33)]))[None]
    # a steady decay, but fewer steps allowed than a random start needs to reach the certificate
    slow = decaying_batch(13, 3, 90, 60)
    # rank 3 asked for 6 vectors: the Gram matrix cannot resolve them, the matrix goes to the exact SVD
    low = torch.tensor(rng.standard_normal((50, 3)) @ rng.standard_normal((3, 40)))[None]
    # a block 2K + 8 as wide as the matrix: the eigensolver's vectors at once
    narrow = decaying_batch(15, 2, 30, 20)
    with gpu.plan():
        found = {name: top_of(x.to(gpu.device), 6, tol=1e-9, max_iter=7)
                 for name, x in (("tied", tied), ("slow", slow), ("low", low), ("narrow", narrow))}
    assert {name: res.method for name, res in found.items()} == {
        "tied": "subspace->gram", "slow": "subspace->gram", "low": "subspace->exact", "narrow": "gram"}
    for name, x in (("slow", slow), ("narrow", narrow), ("low", low)):
        ref = exact_svd(x, 6)
        np.testing.assert_allclose(found[name].S.cpu().numpy(), ref.S.numpy(), rtol=1e-9, atol=1e-7 * ref.S.max())
        if name != "low":  # the low-rank matrix's vectors past its rank are any orthonormal completion
            assert (1 - subspace_sim(found[name].V.cpu(), ref.V) < 1e-10).all()
    torch.testing.assert_close(found["tied"].S.cpu(), gram_svd(tied, 6, small_values=False).S)


@pytest.mark.parametrize("k", [5, 40, 64])
def test_the_eigensolver_on_the_gpu_plan_matches_the_cpu_plan(gpu, k):
    # 40 of 64 vectors: the CPU plan's full eigh (FULL_EIGH_SHARE), the GPU plan's eigh as for any k
    rng = np.random.default_rng(31)
    x = torch.tensor(rng.standard_normal((3, 90, 64)) * np.linspace(2, 0.1, 64))
    G = x.mT @ x
    want_vals, want_vecs = sym_eig(G, k)
    with gpu.plan():
        eig = SymEig(G.to(gpu.device))
        vals, vecs = sym_eig(G.to(gpu.device), k)
        w, Z = all_eigenpairs(G[0].to(gpu.device))
    assert eig.vector_flops(k) == 9.0 * 64 ** 3  # a full eigh: the certified iteration competes with it
    for got in (vals, eig.values):
        np.testing.assert_allclose(got.cpu().numpy(), want_vals.numpy(), rtol=0, atol=1e-12 * want_vals.max().item())
    for got in (vecs, eig.top(k)):
        np.testing.assert_allclose((got.cpu() * want_vecs).sum(-2).abs().numpy(), 1.0, atol=1e-10)  # up to sign
    w, Z = w.cpu().numpy(), Z.cpu().numpy()
    np.testing.assert_allclose((Z * w) @ Z.T, G[0].numpy(), atol=1e-11 * G[0].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])
def test_the_kernels_on_the_gpu_plan_match_the_cpu_plan(gpu, shape, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)  # the CPU plan's bands, against the GPU plan's whole matrix
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, *shape, generator=g).to(dtype)
    X = torch.randn(2, min(shape), 3, generator=g, dtype=torch.float64)
    Y = torch.randn(2, max(shape), 3, generator=g, dtype=torch.float64)
    ops = {"gram": lambda a: kernels.gram(a), "fro_norm": lambda a: kernels.fro_norm(a),
           "long_product": lambda a: kernels.long_product(a, X.to(a.device)),
           "short_product": lambda a: kernels.short_product(a, Y.to(a.device)),
           "mm": lambda a: kernels.mm(a.double(), a.double().mT)}
    want = {name: op(x) for name, op in ops.items()}
    with gpu.plan():
        got = {name: op(x.to(gpu.device)).cpu() for name, op in ops.items()}
    for name in ops:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-12, atol=1e-12, err_msg=name)
    assert torch.equal(got["gram"], got["gram"].mT)



@pytest.mark.parametrize("quick", [False, True])
def test_analyze_on_the_gpu_plan_gives_the_cpu_plans_table(gpu, tmp_path, quick):
    # eight matrices of one shape, four of another and one alone, a base and two checkpoints: on the GPU plan every
    # group is read whole and measured one at a time with batched kernels; on the CPU plan the single matrix is
    # left in its file and the groups go to the measuring threads. The same table, to docs/metrics.md's accuracy
    from safetensors.torch import save_file

    from geometry.offline.analyze import analyze

    rng = np.random.default_rng(9)
    shapes = {**{f"model.layers.{i}.mlp.up_proj.weight": (48, 32) for i in range(8)},
              **{f"model.layers.{i}.self_attn.o_proj.weight": (32, 32) for i in range(4)},
              "model.layers.0.mlp.down_proj.weight": (32, 48)}
    base = {name: rng.standard_normal(shape) / 6 for name, shape in shapes.items()}
    moves = {name: rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1])) for name, shape in
             shapes.items()}
    (tmp_path / "base").mkdir()
    save_file({n: torch.tensor(w, dtype=torch.float32) for n, w in base.items()},
              tmp_path / "base" / "model.safetensors")
    checkpoints = []
    for step in (1, 2):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({n: torch.tensor(w + 1e-2 * step * moves[n] + 1e-3 * rng.standard_normal(w.shape),
                                   dtype=torch.float32) for n, w in base.items()}, folder / "model.safetensors")
        checkpoints.append(folder)

    def table(device: str) -> dict:
        cfg = AnalysisConfig(principal_k=4, lock_k=4, mask_rank=4, quick=quick, device=device, threads=2)
        rows = analyze(tmp_path / "base", checkpoints, config=cfg).rows
        return {(r.step, r.matrix, r.metric): torch.tensor(r.value, dtype=torch.float64) for r in rows}

    want = table("cpu")
    with gpu.plan():
        got = table(gpu.device)
    assert set(got) == set(want) and {matrix for _, matrix, _ in want} == set(shapes)
    for key, value in want.items():
        np.testing.assert_allclose(got[key].numpy(), value.numpy(), err_msg=str(key), **_tolerance(key[2]))


@pytest.mark.parametrize("base_device", ["cpu", "device"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_the_recorder_tracks_a_model_on_its_device_to_the_exact_svd(tmp_path, device, base_device):
    # the recorder's per-step tracking where the model lives: on CUDA, W0 kept pinned on the CPU (or on the device)
    # and every update tracked on the device; at a snapshot step the tracked subspaces and stable rank agree with
    # the exact SVD of the update as docs/metrics.md states (Sim_K within 0.02, stable rank within 2%). The
    # tracking has no branch of its own for CUDA: on the CPU this checks the same steps the CUDA run takes
    from geometry.capture.recorder import Recorder, RecorderConfig
    from geometry.capture.store import read_tracking

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    with Recorder(model, tmp_path / "run", RecorderConfig(lock_k=4, snapshot_every=6, base_device=base_device)) as rec:
        w0 = {n: p.detach().double().cpu().clone() for n, p in rec.params.items()}
        for t in range(1, 7):
            x = torch.randn(64, 48, generator=g).to(device)
            (model(x) - x.flip(-1)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step(t)
    tracked = read_tracking(tmp_path / "run", 6)
    assert set(tracked) == set(w0)
    for name, est in tracked.items():
        d = rec.params[name].detach().double().cpu() - w0[name]
        _, S, Vh = torch.linalg.svd(d)
        assert float(subspace_sim(est.v.double(), Vh[:4].mT)) >= 0.98
        stable_rank = float(S.square().sum() / S[0] ** 2)
        assert float(d.square().sum() / est.s[0].double() ** 2) == pytest.approx(stable_rank, rel=0.02)
