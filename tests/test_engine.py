"""The measuring engine against a plain per-matrix float64 scipy pipeline written here, its precision on
planted float32 cases (SPEC items 2 and 3: a 0.01-degree rotation, an NSS of 1e-5), and a planted locking
onset recovered end to end by ``analyze`` from safetensors checkpoints on disk (SPEC item 7)."""

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from concentration_ref import LADDERS, NAMES, entry_reference, spectral_reference
from safetensors.torch import save_file

from geometry import metrics as M
from geometry.locking import locking_onset, median_onset
from geometry.offline.analyze import analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, group_mb, group_size, locking_sims, measure_step
from geometry.subspaces import subspace_sim


def _orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0]  # (m, k)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns by round-to-nearest-even on the float32 bits, independent of torch."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _top_fraction(score: np.ndarray, alpha: float) -> np.ndarray:
    flat = score.ravel()
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[: math.ceil(alpha * flat.size)]] = True
    return mask.reshape(score.shape)


def _overlaps(D: np.ndarray, Uk: np.ndarray, Vk: np.ndarray) -> tuple[float, float, float, float]:
    m, n, k = D.shape[0], D.shape[1], Uk.shape[1]
    total = np.sum(D ** 2)
    two = np.sum((Uk.T @ D @ Vk) ** 2) / total
    return two, two * m * n / k ** 2, np.sum((Uk.T @ D) ** 2) / total, np.sum((D @ Vk) ** 2) / total


def _ranks(s: np.ndarray) -> dict[str, float]:
    e, p = s ** 2, s / s.sum()
    cum = np.cumsum(e) / e.sum()
    return {
        "stable_rank": e.sum() / e[0],
        "effective_rank": math.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))),
        "r90": np.argmax(cum >= 0.9) + 1.0,
        "r99": np.argmax(cum >= 0.99) + 1.0,
        "fro_norm": math.sqrt(e.sum()),
        "hill_alpha": 1 / np.mean(np.log(s[:9] / s[9])),
    }


def _reference_step(W0: np.ndarray, Wt: np.ndarray, Ws: np.ndarray, cfg: AnalysisConfig, k: int) -> dict:
    """Every value of StepResult.values for one matrix, straight from SPEC.md with scipy's SVD."""
    W0, Wt, Ws = (np.asarray(w, dtype=np.float64) for w in (W0, Wt, Ws))
    U0, s0, V0h = sl.svd(W0, full_matrices=False)
    Ut, st, Vth = sl.svd(Wt, full_matrices=False)
    D, d = Wt - W0, Wt - Ws
    out = {"n_params": float(W0.size)}
    changed = _bf16_bits(W0) != _bf16_bits(Wt)
    out["sparsity_bf16"] = 1 - changed.mean()
    out["sparsity_abs"] = np.mean(np.abs(D) <= cfg.abs_tol)
    for side, A, B in (("u", U0[:, :k], Ut[:, :k]), ("v", V0h[:k].T, Vth[:k].T)):
        theta = np.degrees(sl.subspace_angles(A, B))
        out[f"angle_max_{side}"], out[f"angle_mean_{side}"] = theta.max(), theta.mean()
    out["nss"] = np.linalg.norm(st - s0) / np.linalg.norm(s0)
    Uk, Vk = U0[:, :k], V0h[:k].T
    out["overlap_2s"], out["overlap_2s_ratio"], out["overlap_left"], out["overlap_right"] = _overlaps(D, Uk, Vk)
    (out["overlap_2s_interval"], out["overlap_2s_interval_ratio"], out["overlap_left_interval"],
     out["overlap_right_interval"]) = _overlaps(d, Uk, Vk)
    r = cfg.mask_size(W0.shape, None)
    principal = _top_fraction(np.abs((U0[:, :r] * s0[:r]) @ V0h[:r]), cfg.alpha)
    lowmag = _top_fraction(-np.abs(W0), cfg.alpha)
    out["mask_overlap_principal"] = (changed & principal).sum() / changed.sum()
    out["mask_overlap_lowmag"] = (changed & lowmag).sum() / changed.sum()
    out["mask_overlap_principal_ratio"] = out["mask_overlap_principal"] / cfg.alpha
    out["mask_overlap_lowmag_ratio"] = out["mask_overlap_lowmag"] / cfg.alpha
    out["overlap_left_ratio"] = out["overlap_left"] / (k / W0.shape[0])
    out["overlap_right_ratio"] = out["overlap_right"] / (k / W0.shape[1])
    out.update(_ranks(sl.svdvals(D)))
    out["rel_norm"] = np.linalg.norm(D) / np.linalg.norm(W0)
    out.update(entry_reference(W0, D) | spectral_reference(D))  # docs/metrics.md items 11, 12
    out.update({f"{name}_interval": v for name, v in spectral_reference(d).items() if name.startswith("signal")})
    interval = _ranks(sl.svdvals(d))
    out.update({f"{name}_interval": interval[name] for name in ("stable_rank", "effective_rank", "r90", "r99",
                                                                  "fro_norm")})
    best = np.abs(U0.T @ Ut[:, :10]).max(axis=0)
    out["intruders"] = float((best < cfg.intruder_threshold).sum())
    return out


def _stack(seed: int, L: int, m: int, n: int, dtype: torch.dtype = torch.float32):
    """W0, W_s, W_t as stored: a full-rank update with a strong rank-6 part (a gap after K = 4), some rows
    untouched (exact zeros for sparsity_abs), entries near bf16 resolution (a non-trivial bf16 sparsity)."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((L, m, n)) / math.sqrt(n)
    strong = np.stack([(_orthonormal(rng, m, 6) * [8, 7, 6, 5, 2, 1.5]) @ _orthonormal(rng, n, 6).T
                       for _ in range(L)])
    D = 1e-3 * rng.standard_normal((L, m, n)) + 5e-3 * strong
    D[:, : m // 4] = 0.0
    Ws = W0 + 0.5 * D + 2e-4 * rng.standard_normal((L, m, n))
    return tuple(torch.tensor(a, dtype=torch.float32).to(dtype) for a in (W0, Ws, W0 + D))


@pytest.mark.parametrize("m, n", [(72, 48), (48, 72)])
def test_measure_step_matches_scipy_reference(m, n):
    L = 3
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu")
    W0, Ws, Wt = _stack(0, L, m, n)
    res = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    refs = [_reference_step(W0[i].numpy(), Wt[i].numpy(), Ws[i].numpy(), cfg, 6) for i in range(L)]
    assert set(res.values) == set(refs[0])  # a new metric needs a reference here
    for name, value in res.values.items():
        assert value.shape == (L,) and value.dtype == torch.float64, name
        np.testing.assert_allclose(value.numpy(), [r[name] for r in refs], rtol=1e-7, atol=1e-10, err_msg=name)
    assert 0.1 < refs[0]["sparsity_bf16"] < 0.9 and 0.2 < refs[0]["sparsity_abs"] < 0.3  # the case is not trivial
    for i in range(L):
        np.testing.assert_allclose(res.spectrum[i].numpy(), sl.svdvals(Wt[i].double().numpy()), rtol=1e-10)
        ref_theta = np.sort(np.degrees(sl.subspace_angles(
            sl.svd(W0[i].double().numpy())[0][:, :6], sl.svd(Wt[i].double().numpy())[0][:, :6])))
        np.testing.assert_allclose(res.angles_u[i].numpy(), ref_theta, rtol=1e-7, atol=1e-10)
    # both fast paths taken and passed their checks (the update's: subspace iteration, or eigh where cheaper)
    assert res.methods[0] == "gram" and res.methods[1] in ("subspace", "gram")


QUICK = {"n_params", "sparsity_bf16", "sparsity_abs", "stable_rank", "effective_rank", "r90", "r99", "fro_norm",
         "hill_alpha", "rel_norm", *NAMES}


def test_quick_suite_measures_the_update_alone_as_the_full_one_does():
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu")
    quick = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu", quick=True)
    W0, Ws, Wt = _stack(5, 2, 72, 48)
    full = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    base = decompose_base(W0, quick)
    assert base.svd is None and base.principal is None  # W0 is not decomposed
    fast = measure_step(base, Wt, Ws, quick)
    assert set(fast.values) == QUICK
    for name in QUICK:
        assert torch.equal(fast.values[name], full.values[name]), name
    assert torch.equal(fast.VK, full.VK) and fast.angles_u is None and fast.spectrum is None


COUNTS = {"n_params", "sparsity_bf16", "sparsity_abs", "r90", "r99", "r90_interval", "r99_interval", "intruders",
          "mask_overlap_principal", "mask_overlap_lowmag", "mask_overlap_principal_ratio", "mask_overlap_lowmag_ratio",
          "signal_rank", "signal_rank_interval", *LADDERS}


@pytest.mark.parametrize("m, n", [(90, 43), (43, 90), (16, 16)])
def test_a_packed_mask_gives_back_its_bands_bit_for_bit(m, n):
    # packed 8 entries to a byte along the long side's rows (43 columns: a partial last byte), read in bands
    from geometry.offline.blocked import LongMask

    mask = torch.from_numpy(np.random.default_rng(3).random((2, m, n)) < 0.3)
    packed = LongMask(mask)
    long = mask if m >= n else mask.mT
    for rows in (slice(0, 7), slice(7, 40), slice(40, max(m, n))):
        assert torch.equal(packed.band(rows), long[:, rows])
    assert packed._packed.numel() == 2 * max(m, n) * math.ceil(min(m, n) / 8)


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("m, n", [(90, 40), (40, 90)])
def test_updates_in_blocks_agree_with_the_whole_update(m, n, quick, monkeypatch):
    # blocks of 7 rows (or columns) of the updates D_t and d_t against each formed whole (one block), and the
    # masks' scores in bands: the Gram matrices and projections are summed in another order, nothing else
    import geometry.kernels as kernels
    import geometry.offline.blocked as blocked

    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu", quick=quick)
    W0, Ws, Wt = _stack(6, 2, m, n)
    whole = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)  # bands of 7 rows
    assert len(blocked.BlockedUpdate(W0, Wt).bands) == math.ceil(max(m, n) / 7)
    parts = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    assert set(parts.values) == (QUICK if quick else set(whole.values))
    for name, value in parts.values.items():
        if name in COUNTS:
            assert torch.equal(value, whole.values[name]), name  # counts: exact
        else:
            np.testing.assert_allclose(value.numpy(), whole.values[name].numpy(), rtol=1e-10, err_msg=name)
    assert (1 - subspace_sim(parts.VK, whole.VK) < 1e-12).all() and (1 - subspace_sim(parts.UK, whole.UK) < 1e-12).all()


def test_quick_suite_takes_the_exact_svd_when_the_gram_matrix_cannot_resolve_the_top_K():
    # a rank-2 update and K = 4: the Gram matrix's 3rd and 4th values are rounding noise, so the update is
    # formed whole and decomposed exactly; its values match the scipy reference
    rng = np.random.default_rng(9)
    W0 = torch.tensor(rng.standard_normal((1, 50, 30)))
    Wt = W0 + torch.tensor(1e-3 * rng.standard_normal((1, 50, 2)) @ rng.standard_normal((1, 2, 30)))
    quick = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu", quick=True)
    before = Wt.clone()
    res = measure_step(decompose_base(W0, quick), Wt, W0, quick)
    assert torch.equal(Wt, before)  # float64 weights are read, not written (the update is a copy)
    assert res.methods == ["subspace->exact"]
    ref = _reference_step(W0[0].numpy(), Wt[0].numpy(), W0[0].numpy(), quick, 6)
    for name in ("stable_rank", "fro_norm", "rel_norm", "sparsity_bf16"):
        assert res.values[name].item() == pytest.approx(ref[name], rel=1e-9), name


def test_first_checkpoint_measures_the_interval_update_as_the_cumulative_one():
    # W_s is the base itself: d_t = D_t, measured once, and every value as the reference's
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu")
    W0, _, Wt = _stack(3, 2, 72, 48)
    base = decompose_base(W0, cfg)
    res = measure_step(base, Wt, base.W0, cfg)
    refs = [_reference_step(W0[i].numpy(), Wt[i].numpy(), W0[i].numpy(), cfg, 6) for i in range(2)]
    for name, value in res.values.items():
        np.testing.assert_allclose(value.numpy(), [r[name] for r in refs], rtol=1e-7, atol=1e-10, err_msg=name)
    for name in ("stable_rank", "effective_rank", "fro_norm", "overlap_2s"):
        assert torch.equal(res.values[f"{name}_interval"], res.values[name])


@pytest.mark.parametrize("update_svd", ["gram", "exact"])
def test_intruders_left_undecided_by_the_top_vectors_are_counted_against_all(update_svd):
    # W_t's top direction replaced by one orthogonal to W0's top k: the top k cannot decide it, and the engine
    # counts it against every left vector of W0 (a fresh direction: an intruder; one that is W0's 30th: not),
    # from its Gram matrix's eigenvectors, or from the exact SVD where the base was decomposed exactly
    rng = np.random.default_rng(21)
    m, n = 60, 40
    Q = _orthonormal(rng, m, m)
    U, fresh, V = Q[:, :n], Q[:, n:], _orthonormal(rng, n, n)
    s = np.linspace(4, 1, n)
    W0 = (U * s) @ V.T
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=2, device="cpu", update_svd=update_svd)
    spread = U[:, 20:30].sum(1) / math.sqrt(10)  # |cos| 0.32 with each of ten later vectors: an intruder
    for new, want in ((fresh[:, 0], 1.0), (U[:, 29], 0.0), (spread, 1.0)):
        Ut = U.copy()
        Ut[:, 0] = new
        Wt = (Ut * s) @ V.T
        base = decompose_base(torch.tensor(W0)[None], cfg)
        assert base.svd.U.shape[-1] == 10  # the top max(k, r, 10) vectors only
        res = measure_step(base, torch.tensor(Wt)[None], base.W0, cfg)
        assert res.values["intruders"].item() == want == _reference_step(W0, Wt, W0, cfg, 6)["intruders"]
        assert 0 in base.left  # decided against all of W0's vectors, computed once for this matrix


def test_intruders_of_a_wide_base_left_undecided_are_counted_against_all():
    # m < n: W0's left vectors are the Gram matrix's eigenvectors, all of R^m
    rng = np.random.default_rng(22)
    m, n = 40, 60
    U, V = _orthonormal(rng, m, m), _orthonormal(rng, n, m)
    s = np.linspace(4, 1, m)
    W0 = (U * s) @ V.T
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=2, device="cpu")
    spread = U[:, 20:30].sum(1) / math.sqrt(10)
    for new, want in ((U[:, 29], 0.0), (spread, 1.0)):
        Ut = U.copy()
        Ut[:, 0] = new
        Wt = (Ut * s) @ V.T
        base = decompose_base(torch.tensor(W0)[None], cfg)
        res = measure_step(base, torch.tensor(Wt)[None], base.W0, cfg)
        assert res.values["intruders"].item() == want == _reference_step(W0, Wt, W0, cfg, 6)["intruders"]
        assert 0 in base.left


def test_an_interval_update_lapack_refuses_is_measured_by_the_exact_svd(monkeypatch):
    # LAPACK refusing the interval update's Gram matrix (as it refuses one holding Inf): its spectrum comes from
    # the update formed whole, by the exact SVD; every metric not drawn from it is the usual path's
    import geometry.offline.engine as engine

    def refuses(G, k=0, *, overwrite=False):
        raise torch.linalg.LinAlgError("LAPACK dsytrd failed (info 1)")

    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu")
    W0, Ws, Wt = _stack(7, 2, 60, 40)
    base = decompose_base(W0, cfg)
    usual = measure_step(base, Wt, Ws, cfg)
    monkeypatch.setattr(engine, "sym_eig", refuses)
    res = measure_step(base, Wt, Ws, cfg)
    interval = {f"{name}_interval" for name in ("stable_rank", "effective_rank", "r90", "r99", "fro_norm")}
    for i in range(2):
        want = _ranks(sl.svdvals((Wt.double() - Ws.double())[i].numpy()))
        for name in interval:
            np.testing.assert_allclose(res.values[name][i].item(), want[name.removesuffix("_interval")], rtol=1e-12,
                                       err_msg=name)
    for name, value in usual.values.items():
        if not name.endswith("_interval") or name.startswith("overlap"):  # not from the interval spectrum
            torch.testing.assert_close(res.values[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_measure_step_on_bf16_checkpoints_matches_scipy_reference():
    L = 2
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu")
    W0, Ws, Wt = _stack(8, L, 64, 48, torch.bfloat16)
    res = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    refs = [_reference_step(*(w[i].float().numpy() for w in (W0, Wt, Ws)), cfg, 6) for i in range(L)]
    # bf16 |W0| can tie exactly at the median, where which entries the low-magnitude mask takes is up to topk
    names = [name for name in res.values if not name.startswith("mask_overlap_lowmag")]
    for name in names:
        np.testing.assert_allclose(res.values[name].numpy(), [r[name] for r in refs], rtol=1e-7, atol=1e-10,
                                   err_msg=name)
    assert 0.1 < refs[0]["sparsity_bf16"] < 0.9


def test_measure_step_update_subspaces_match_exact():
    cfg = AnalysisConfig(principal_k=6, lock_k=4, device="cpu")
    W0, Ws, Wt = _stack(1, 2, 64, 40)
    res = measure_step(decompose_base(W0, cfg), Wt, Ws, cfg)
    assert res.UK.shape == (2, 64, 4) and res.VK.shape == (2, 40, 4)
    for i in range(2):
        U, _, Vh = sl.svd((Wt[i].double() - W0[i].double()).numpy(), full_matrices=False)
        A = res.UK[i].numpy()
        assert np.sum((A.T @ U[:, :4]) ** 2) / 4 > 0.999
        assert np.sum((res.VK[i].numpy().T @ Vh[:4].T) ** 2) / 4 > 0.999


def test_measure_step_default_k_and_exact_update_path():
    cfg = AnalysisConfig(lock_k=4, update_svd="exact", device="cpu")
    W0, Ws, Wt = _stack(2, 2, 64, 48)
    base = decompose_base(W0, cfg)
    assert (base.k, base.r) == (6, 1)  # no hidden size given: scaled to the smaller side, round(512 * 48 / 4096)
    res = measure_step(base, Wt, Ws, cfg)
    assert res.methods[1] == "exact" and res.angles_u.shape == (2, 6)
    ref = _reference_step(W0[0].numpy(), Wt[0].numpy(), Ws[0].numpy(), cfg, 6)
    assert res.values["angle_max_v"][0].item() == pytest.approx(ref["angle_max_v"], rel=1e-7)


def test_measure_step_of_unchanged_weights():
    cfg = AnalysisConfig(principal_k=4, lock_k=4, device="cpu")
    W0, _, _ = _stack(3, 2, 40, 32)
    res = measure_step(decompose_base(W0, cfg), W0.clone(), W0.clone(), cfg)
    v = res.values
    assert (v["sparsity_bf16"] == 1).all() and (v["sparsity_abs"] == 1).all()
    assert (v["nss"] < 1e-14).all() and (v["angle_max_u"] < 1e-5).all() and (v["intruders"] == 0).all()
    assert (v["fro_norm"] == 0).all() and torch.isnan(v["stable_rank"]).all()
    sims = locking_sims([res])[0]
    assert torch.isnan(sims["sim_final_v"]).all()  # a zero update has no subspace


# --- planted precision (SPEC items 2 and 3) ----------------------------------------------------

def _planted_factors(seed: int, m: int, n: int, k: int):
    rng = np.random.default_rng(seed)
    U = _orthonormal(rng, m, m)
    V = _orthonormal(rng, n, n)
    s = np.concatenate([np.linspace(10, 6, k), np.linspace(2, 0.2, min(m, n) - k)])  # a gap after k
    return U, s, V


def _engine_angles(W0: torch.Tensor, Wt: torch.Tensor, k: int) -> dict[str, float]:
    """The engine's path on one float32 matrix: exact SVD of W0, gram_svd of W_t, principal_angles."""
    cfg = AnalysisConfig(principal_k=k, lock_k=4, device="cpu")
    res = measure_step(decompose_base(W0[None], cfg), Wt[None], W0[None], cfg)
    assert res.methods[0] == "gram"
    return {name: res.values[name].item() for name in ("angle_max_u", "angle_max_v", "nss")}


@pytest.mark.parametrize("theta_deg", [10.0, 1.0, 0.1, 0.01])
def test_planted_rotation_is_recovered_from_float32(theta_deg):
    m, n, k = 96, 64, 6
    U, s, V = _planted_factors(4, m, n, k)
    th = math.radians(theta_deg)
    Ur = U.copy()  # Givens rotation of u_1 towards u_{k+1}: one principal angle theta, the rest zero
    Ur[:, 0] = math.cos(th) * U[:, 0] + math.sin(th) * U[:, k]
    Ur[:, k] = -math.sin(th) * U[:, 0] + math.cos(th) * U[:, k]
    W0 = torch.tensor((U[:, :n] * s) @ V.T, dtype=torch.float32)
    Wt = torch.tensor((Ur[:, :n] * s) @ V.T, dtype=torch.float32)
    got = _engine_angles(W0, Wt, k)
    assert got["angle_max_u"] == pytest.approx(theta_deg, rel=1e-2)
    assert got["angle_max_v"] < 1e-2 * theta_deg  # V did not move (float32 storage noise only)
    if theta_deg == 0.01:
        # the naive way fails: cos(0.01 deg) = 1 - 1.5e-8 rounds to 1 in float32, an angle of 0
        U0 = torch.linalg.svd(W0.double())[0][:, :k]
        Ut = torch.linalg.svd(Wt.double())[0][:, :k]
        cos32 = torch.linalg.svdvals(U0.mT @ Ut).float().clamp(max=1)
        naive = torch.rad2deg(torch.arccos(cos32)).max().item()
        assert abs(naive - theta_deg) > 0.1 * theta_deg


@pytest.mark.parametrize("s_min", [0.1, 1e-8])  # Gram fast path; ill-conditioned: its exact fallback
def test_planted_nss_of_1e_5_is_recovered_from_float32(s_min):
    m, n = 96, 64
    rng = np.random.default_rng(5)
    U, V = _orthonormal(rng, m, n), _orthonormal(rng, n, n)
    s = np.geomspace(10, s_min, n)
    c = 1e-5 * rng.choice([-1.0, 1.0], n)  # |c_i| = 1e-5 for every i: NSS = 1e-5 exactly before storage
    W0 = torch.tensor((U * s) @ V.T, dtype=torch.float32)
    Wt = torch.tensor((U * (s * (1 + c))) @ V.T, dtype=torch.float32)
    s0, st = (sl.svdvals(w.double().numpy()) for w in (W0, Wt))
    stored = np.linalg.norm(st - s0) / np.linalg.norm(s0)  # the NSS the float32 matrices really have
    assert stored == pytest.approx(1e-5, rel=0.03)  # float32 storage moved it by well under a few %
    cfg = AnalysisConfig(principal_k=6, lock_k=4, device="cpu")
    res = measure_step(decompose_base(W0[None], cfg), Wt[None], W0[None], cfg)
    assert res.methods[0] == ("gram" if s_min > 1e-6 else "gram->exact")
    assert res.values["nss"].item() == pytest.approx(stored, rel=1e-2)


# --- locking ----------------------------------------------------------------------------------

def test_locking_sims_match_exact_subspaces():
    cfg = AnalysisConfig(principal_k=4, lock_k=4, device="cpu")
    W0, Ws, Wt = _stack(6, 2, 48, 40)
    base = decompose_base(W0, cfg)
    results = [measure_step(base, Ws, W0, cfg), measure_step(base, Wt, Ws, cfg)]
    sims = locking_sims(results)

    def top_v(W):
        return sl.svd((W.double() - W0.double()).numpy()[0], full_matrices=False)[2][:4].T

    ref = np.sum((top_v(Ws).T @ top_v(Wt)) ** 2) / 4
    assert sims[0]["sim_final_v"][0].item() == pytest.approx(ref, abs=1e-3)
    assert sims[1]["sim_final_v"][0].item() == pytest.approx(1.0, abs=1e-12)
    assert sims[1]["sim_prev_v"][0].item() == pytest.approx(ref, abs=1e-3)
    assert torch.isnan(sims[0]["sim_prev_u"]).all()  # no previous step


MEASURE_ONE_MATRIX = """
import sys
import torch
from geometry.offline.memory import return_freed_memory
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, measure_step
from geometry.offline import threads

def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) / 1024

return_freed_memory()  # as analyze sets the allocator up, and its kernels on one thread
threads.kernels().__enter__()
cfg = AnalysisConfig(device="cpu")
m, n = int(sys.argv[1]), int(sys.argv[2])
def run(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.empty(1, m, n).normal_(generator=g)  # filled in place: no temporaries
    Ws = torch.empty(1, m, n).normal_(generator=g).mul_(1e-3).add_(W0)
    Wt = torch.empty(1, m, n).normal_(generator=g).mul_(1e-3).add_(Ws)
    base = decompose_base(W0, cfg, hidden=int(sys.argv[3]))
    first = measure_step(base, Ws, W0, cfg)
    measure_step(base, Wt, Ws, cfg, first.VK)
run(64, 48, 0)  # the libraries' own buffers, before the measured part
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here
run(m, n, 1)
print(status("VmHWM:") - before)
"""


def test_group_memory_bound_holds_for_a_measured_matrix():
    # base + two checkpoints of one float32 matrix in a fresh process: the memory it takes above the libraries is
    # within the bound that sizes batches and threads, and not far below it
    import subprocess
    import sys

    cfg = AnalysisConfig(device="cpu")
    for shape, hidden in (((3072, 1024), 1024), ((1024, 4096), 4096)):  # an MLP and a wide k/v-like matrix
        k = cfg.principal_size(shape, hidden)
        out = subprocess.run([sys.executable, "-c", MEASURE_ONE_MATRIX, *map(str, (*shape, hidden))],
                             capture_output=True, text=True, check=True).stdout
        used, bound = float(out.split()[-1]), group_mb(shape, 1, k)
        assert 0.5 * bound < used <= bound, (shape, used, bound)
        assert group_size(shape, group_mb(shape, 3, k), k) == 3
    assert group_size((4096, 4096), 1.0) == 1  # at least one


# --- end to end: a planted locking onset through analyze ---------------------------------------

STEPS = [10, 20, 30, 40, 50, 60, 70, 80]
NAMES = {  # matrix -> first step of its planted rank-K direction (None: fresh random directions throughout)
    "model.layers.0.mlp.up_proj.weight": 40,
    "model.layers.1.mlp.up_proj.weight": 60,
    "model.layers.2.mlp.up_proj.weight": None,
}


def _write_run(root, m: int = 64, n: int = 48, K: int = 4):
    """base/model.safetensors and run/checkpoint-N/model.safetensors with
    D_t = 0.1 * (fresh Gaussian) + g(t) * P, P a fixed rank-K matrix, g = 40 (t - t0 + 1) from t0 on."""
    rng = np.random.default_rng(7)
    base = {name: rng.standard_normal((m, n)) * 0.5 for name in NAMES}
    planted = {name: (_orthonormal(rng, m, K) * [1.0, 0.9, 0.8, 0.7]) @ _orthonormal(rng, n, K).T
               for name in NAMES}
    (root / "base").mkdir()
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in base.items()}, root / "base" / "model.safetensors")
    for step in STEPS:
        tensors = {}
        for name, t0 in NAMES.items():
            grow = 0.0 if t0 is None or step < t0 else 40.0 * ((step - t0) // 10 + 1)
            D = 0.1 * rng.standard_normal((m, n)) + grow * planted[name]
            tensors[name] = torch.tensor(base[name] + D, dtype=torch.float32)
        (root / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(tensors, root / "run" / f"checkpoint-{step}" / "model.safetensors")


def test_analyze_recovers_planted_locking_onset(tmp_path):
    _write_run(tmp_path)
    result = analyze(tmp_path / "base", [tmp_path / "run"], label="opd",
                     config=AnalysisConfig(principal_k=4, lock_k=4, device="cpu"))
    assert result.unique("step") == STEPS
    onsets = []
    for name, t0 in NAMES.items():
        rows = result.where(run="opd", matrix=name)
        assert {r.layer for r in rows} == {int(name.split(".")[2])} and rows.unique("module") == ["up_proj"]
        for side in ("u", "v"):
            traj = sorted((r.step, r.value) for r in rows.where(metric=f"sim_final_{side}"))
            assert [s for s, _ in traj] == STEPS
            assert traj[-1][1] == pytest.approx(1.0)
            onset = locking_onset([s for s, _ in traj], [v for _, v in traj], tau=0.9)
            assert onset == t0, (name, side, traj)
        before = [r.value for r in rows.where(metric="sim_final_v") if r.step < (t0 or STEPS[-1])]
        assert max(before) < 0.5  # fresh random directions are far from the final subspace
        onsets.append(onset)
    assert median_onset(onsets) == 60  # lower median of (40, 60, never)


def test_update_paths_agree_with_exact():
    """The Gram and randomized paths for the update's spectrum and top-K subspaces match the exact SVD."""
    W0, Ws, Wt = _stack(3, 2, 80, 56)
    results = {}
    for path in ("exact", "gram", "randomized"):
        cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=16, device="cpu", update_svd=path)
        base = decompose_base(W0, cfg)
        steps = [measure_step(base, Ws, W0, cfg), measure_step(base, Wt, Ws, cfg)]
        results[path] = (steps, locking_sims(steps))
    ref_steps, ref_sims = results["exact"]
    for path in ("gram", "randomized"):
        steps, sims = results[path]
        for name in ("stable_rank", "effective_rank", "r90", "hill_alpha"):
            np.testing.assert_allclose(steps[1].values[name], ref_steps[1].values[name], rtol=1e-6, err_msg=path)
        for name in ("sim_final_u", "sim_final_v", "sim_prev_v"):
            # the default path's subspaces are certified to 1e-7 (Davis-Kahan); the randomized one is checked
            tol = 1e-6 if path == "gram" else 1e-3
            np.testing.assert_allclose(sims[0][name], ref_sims[0][name], atol=tol, err_msg=f"{path} {name}")
    assert results["gram"][0][1].methods[1] == "gram"  # on the CPU the kept tridiagonal's vectors: cheaper


@pytest.mark.parametrize("shape, hidden, k, r", [
    ((4096, 4096), 4096, 512, 64),  # the paper's Qwen3-8B q_proj
    ((1024, 4096), 4096, 512, 64),  # its k/v projections get the same k (SPEC 2)
    ((12288, 4096), 4096, 512, 64),
    ((128, 128), 128, 16, 2),  # the demo's hidden-128 student
    ((384, 128), 128, 16, 2),
    ((64, 48), None, 6, 1),  # no config.json: the matrix's smaller side stands for h
    ((5, 7), None, 1, 1),  # at least 1
    ((8, 4096), 4096, 8, 8),  # at most the rank
])
def test_principal_and_mask_sizes_scale_with_the_hidden_size(shape, hidden, k, r):
    cfg = AnalysisConfig()
    assert (cfg.principal_size(shape, hidden), cfg.mask_size(shape, hidden)) == (k, r)
    assert AnalysisConfig(principal_k=3, mask_rank=2).principal_size(shape, hidden) == min(3, *shape)



def test_overlap_and_mask_ratios_on_planted_updates():
    """An update inside W0's top-k subspaces has every overlap at 1, so each ratio is 1 / its baseline; a random
    dense update sits at its baselines (ratios near 1); mask ratios are the overlaps over alpha."""
    m, n, k = 60, 40, 5
    cfg = AnalysisConfig(principal_k=k, lock_k=4, alpha=0.3, device="cpu")
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(1, m, n, generator=gen, dtype=torch.float64)
    base = decompose_base(W0, cfg)
    Uk, Vk = base.svd.U[..., :k], base.svd.V[..., :k]
    inside = W0 + 1e-2 * Uk @ torch.randn(1, k, k, generator=gen, dtype=torch.float64) @ Vk.mT
    v = measure_step(base, inside, W0, cfg).values
    for name, ratio in (("overlap_2s", m * n / k**2), ("overlap_left", m / k), ("overlap_right", n / k)):
        assert v[name].item() == pytest.approx(1.0, abs=1e-12)
        assert v[f"{name}_ratio"].item() == pytest.approx(ratio, rel=1e-12)
    ratios = {name: [] for name in ("overlap_2s_ratio", "overlap_left_ratio", "overlap_right_ratio")}
    for _ in range(200):
        rnd = measure_step(base, W0 + 1e-2 * torch.randn(1, m, n, generator=gen, dtype=torch.float64), W0, cfg)
        for name in ratios:
            ratios[name].append(rnd.values[name].item())
        assert rnd.values["mask_overlap_lowmag_ratio"].item() == pytest.approx(
            rnd.values["mask_overlap_lowmag"].item() / 0.3, rel=1e-12)
    for name, vals in ratios.items():
        assert abs(np.mean(vals) - 1) < 4 * np.std(vals) / math.sqrt(len(vals)) + 0.02, name


def test_locking_sims_are_nan_against_a_zero_previous_update():
    """A matrix untouched at the first checkpoint has no subspace there: Sim_K to it is NaN (SPEC 7), not a
    number compared against whatever basis the decomposition returned for a zero matrix."""
    cfg = AnalysisConfig(principal_k=2, lock_k=2, device="cpu")
    gen = torch.Generator().manual_seed(5)
    W0 = torch.randn(1, 10, 8, generator=gen, dtype=torch.float64)
    base = decompose_base(W0, cfg)
    W2 = W0 + 0.1 * torch.randn(1, 10, 8, generator=gen, dtype=torch.float64)
    results = [measure_step(base, W0.clone(), W0, cfg), measure_step(base, W2, W0, cfg)]
    first, second = locking_sims(results)
    assert math.isnan(first["sim_final_v"].item()) and math.isnan(second["sim_prev_v"].item())
    assert second["sim_final_v"].item() == pytest.approx(1.0)


def test_an_update_given_as_factors_measures_as_the_dense_update():
    """A LoRA-like update D = L R: the rank metrics from its factors equal LAPACK's on L R, and agree with the
    dense path on W0 + L R (whose Gram spectrum has a floor near sqrt(eps) s_1: effective rank differs there)."""
    cfg = AnalysisConfig(principal_k=4, lock_k=3, device="cpu")
    gen = torch.Generator().manual_seed(7)
    W0 = torch.randn(2, 36, 28, generator=gen, dtype=torch.float64)
    L = 1e-2 * torch.randn(2, 36, 6, generator=gen, dtype=torch.float64)
    R = torch.randn(2, 6, 28, generator=gen, dtype=torch.float64)
    base = decompose_base(W0, cfg)
    dense = measure_step(base, W0 + L @ R, W0, cfg)
    factored = measure_step(base, W0 + L @ R, W0, cfg, update=(L, R))
    assert factored.methods[1] == "factored" and dense.methods[1] != "factored"
    exact = M.rank_stats(torch.linalg.svdvals(L @ R))  # the reference: LAPACK on the product itself
    for name in ("stable_rank", "effective_rank", "r90", "r99", "fro_norm", "hill_alpha"):
        np.testing.assert_allclose(factored.values[name].numpy(), getattr(exact, name).numpy(), rtol=1e-10,
                                   equal_nan=True, err_msg=name)
    for name in ("stable_rank", "r90", "r99", "fro_norm"):  # the dense path agrees to its Gram spectrum's floor
        np.testing.assert_allclose(factored.values[name].numpy(), dense.values[name].numpy(), rtol=1e-8,
                                   err_msg=name)
    assert torch.all(subspace_sim(factored.VK, dense.VK) > 1 - 1e-8)
    wide = measure_step(base, W0 + L @ R, W0, AnalysisConfig(principal_k=4, lock_k=8, device="cpu"), update=(L, R))
    assert wide.methods[1] != "factored"  # K above the factors' rank: the dense path
