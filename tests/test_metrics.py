"""SPEC items 1-6 and 8: every metric against a plain float64 numpy/scipy reference written here, on
random and batched inputs, and on planted inputs whose answer is known in closed form."""

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from geometry import kernels
from geometry import metrics as M
from geometry.buffers import Scratch
from geometry.linalg import exact_svd, spectrum


def _orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k)))[0]  # (m, k)


def _bf16_bits(x) -> np.ndarray:
    """bf16 bit patterns of float32 values by round-to-nearest-even on the uint32 view, independent of torch."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# --- 1. bf16 update sparsity -------------------------------------------------------------------

def test_sparsity_bf16_matches_bitwise_reference_per_matrix():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 40, 30, generator=gen) * 0.05
    wt = w0 + torch.randn(3, 40, 30, generator=gen) * 2e-4  # about the bf16 resolution: a mix of both
    got = M.sparsity_bf16(w0, wt)
    for i in range(3):
        unchanged = _bf16_bits(w0[i].numpy()) == _bf16_bits(wt[i].numpy())
        assert 0.1 < unchanged.mean() < 0.9  # the case is not trivial
        assert got[i].item() == pytest.approx(unchanged.mean(), abs=1e-15)
        np.testing.assert_array_equal(M.changed_mask(w0[i], wt[i]).numpy(), ~unchanged)


def test_float32_values_rounding_to_one_bf16_are_unchanged():
    base = torch.ones(5)
    ulp = 2.0 ** -7  # bf16 spacing at 1.0
    # below half an ulp; exactly half (tie to even: 1.0); half above an odd mantissa (tie to even: up); one ulp
    wt = torch.tensor([1.0, 1 + ulp / 4, 1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp], dtype=torch.float32)
    expected = ~(_bf16_bits(base.numpy()) == _bf16_bits(wt.numpy()))
    np.testing.assert_array_equal(expected, [False, False, False, True, True])  # the reference agrees
    np.testing.assert_array_equal(M.changed_mask(base[None], wt[None])[0].numpy(), expected)


def test_changed_mask_on_bf16_input():
    gen = torch.Generator().manual_seed(1)
    w0 = (torch.randn(20, 16, generator=gen) * 0.1).to(torch.bfloat16)
    bits = w0.float().numpy().view(np.uint32)
    assert not (bits & 0xFFFF).any()  # bf16 values are float32 values with zero low halves
    wt = w0.clone()
    wt[3, 4] = torch.nextafter(w0[3, 4].float(), torch.tensor(1.0)).to(torch.bfloat16)  # a sub-ulp step: no change
    wt[5, :] = wt[5, :] * 1.5  # a whole row moved by far more than an ulp
    wt_bits = wt.float().numpy().view(np.uint32) >> 16
    reference = (bits >> 16) != wt_bits
    assert reference.sum() == 16
    np.testing.assert_array_equal(M.changed_mask(w0, wt).numpy(), reference)
    # mixed storage: a float32 checkpoint holding exactly the bf16 base values is unchanged
    assert M.sparsity_bf16(w0, w0.float()).item() == 1.0


def test_sparsity_abs_matches_numpy():
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(2, 30, 20, generator=gen, dtype=torch.float64)
    d = torch.randn(2, 30, 20, generator=gen, dtype=torch.float64) * 1e-5
    wt = w0 + d
    got = M.sparsity_abs(w0, wt)
    for i in range(2):
        ref = (np.abs(wt[i].numpy() - w0[i].numpy()) <= 1e-5).mean()
        assert 0.3 < ref < 0.9
        assert got[i].item() == pytest.approx(ref, abs=1e-15)
    assert M.sparsity_abs(w0, wt, tol=1.0).eq(1.0).all()


# --- 2. principal angles -----------------------------------------------------------------------

def test_angle_stats_match_scipy_in_degrees():
    rng = np.random.default_rng(3)
    A = np.stack([_orthonormal(rng, 30, 5) for _ in range(3)])
    B = np.stack([_orthonormal(rng, 30, 5) for _ in range(3)])
    amax, amean, curve = M.angle_stats(torch.tensor(A), torch.tensor(B))
    for i in range(3):
        ref = np.sort(np.degrees(sl.subspace_angles(A[i], B[i])))
        np.testing.assert_allclose(curve[i].numpy(), ref, atol=1e-10)
        assert amax[i].item() == pytest.approx(ref.max(), abs=1e-10)
        assert amean[i].item() == pytest.approx(ref.mean(), abs=1e-10)


# --- 3. normalised spectral shift --------------------------------------------------------------

def test_nss_matches_formula_batched():
    rng = np.random.default_rng(4)
    s0 = np.sort(rng.random((3, 25)))[:, ::-1]
    st = s0 + rng.standard_normal((3, 25)) * 1e-3
    got = M.nss(torch.tensor(s0.copy()), torch.tensor(st.copy()))
    ref = np.linalg.norm(st - s0, axis=-1) / np.linalg.norm(s0, axis=-1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_nss_of_planted_relative_change_is_exact_in_float64():
    s0 = torch.tensor(np.geomspace(10, 0.1, 50))
    sign = torch.tensor([(-1.0) ** i for i in range(50)], dtype=torch.float64)
    assert M.nss(s0, s0 * (1 + 1e-5 * sign)).item() == pytest.approx(1e-5, rel=1e-9)
    assert M.nss(s0, s0).item() == 0.0


# --- 4. principal-direction overlap ------------------------------------------------------------

def test_overlap_matches_formula_batched():
    rng = np.random.default_rng(5)
    m, n, k = 30, 20, 4
    d = rng.standard_normal((3, m, n))
    U = np.stack([_orthonormal(rng, m, k) for _ in range(3)])
    V = np.stack([_orthonormal(rng, n, k) for _ in range(3)])
    got = M.overlap(torch.tensor(d), torch.tensor(U), torch.tensor(V))
    for i in range(3):
        total = np.sum(d[i] ** 2)
        two = np.sum((U[i].T @ d[i] @ V[i]) ** 2) / total
        assert got.two_sided[i].item() == pytest.approx(two, rel=1e-12)
        assert got.two_sided_ratio[i].item() == pytest.approx(two / (k * k / (m * n)), rel=1e-12)
        assert got.left[i].item() == pytest.approx(np.sum((U[i].T @ d[i]) ** 2) / total, rel=1e-12)
        assert got.right[i].item() == pytest.approx(np.sum((d[i] @ V[i]) ** 2) / total, rel=1e-12)


def test_overlap_recovers_planted_energy_split():
    # D = a U_k A V_k^T + b U_perp B V_perp^T + c U_k C V_perp^T + e U_perp E V_k^T: four Frobenius-orthogonal
    # blocks, so two-sided = a^2/T, left = (a^2 + c^2)/T, right = (a^2 + e^2)/T with T = a^2 + b^2 + c^2 + e^2.
    rng = np.random.default_rng(6)
    m, n, k = 40, 30, 5
    Um, Vn = _orthonormal(rng, m, m), _orthonormal(rng, n, n)
    s = np.linspace(3, 1, n)  # distinct singular values: span(U_k) is well defined
    W0 = (Um[:, :n] * s) @ Vn.T
    base = exact_svd(torch.tensor(W0), k)

    def block(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        inner = rng.standard_normal((rows.shape[1], cols.shape[1]))
        return rows @ (inner / np.linalg.norm(inner)) @ cols.T  # unit Frobenius norm

    a, b, c, e = 0.3, 1.0, 0.5, 0.2
    Uk, Up, Vk, Vp = Um[:, :k], Um[:, k:], Vn[:, :k], Vn[:, k:]
    D = a * block(Uk, Vk) + b * block(Up, Vp) + c * block(Uk, Vp) + e * block(Up, Vk)
    T = a * a + b * b + c * c + e * e
    got = M.overlap(torch.tensor(D), base.U, base.V)
    assert got.two_sided.item() == pytest.approx(a * a / T, rel=1e-9)
    assert got.left.item() == pytest.approx((a * a + c * c) / T, rel=1e-9)
    assert got.right.item() == pytest.approx((a * a + e * e) / T, rel=1e-9)
    assert got.two_sided_ratio.item() == pytest.approx(a * a / T * m * n / (k * k), rel=1e-9)


def test_overlap_of_random_update_is_at_baseline():
    rng = np.random.default_rng(7)
    L, m, n, k = 60, 48, 40, 8
    U = torch.tensor(np.stack([_orthonormal(rng, m, k) for _ in range(L)]))
    V = torch.tensor(np.stack([_orthonormal(rng, n, k) for _ in range(L)]))
    got = M.overlap(torch.tensor(rng.standard_normal((L, m, n))), U, V)
    for ratio in (got.two_sided_ratio, got.left / (k / m), got.right / (k / n)):
        stderr = ratio.std().item() / math.sqrt(L)
        assert abs(ratio.mean().item() - 1.0) < 4 * stderr


# --- 5. mask localisation ----------------------------------------------------------------------

def _top_fraction_ref(score: np.ndarray, alpha: float) -> np.ndarray:
    flat = score.ravel()
    count = -(-round(alpha * 1000) * flat.size // 1000)  # exact ceil(alpha * mn) for alpha with 3 decimals
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:count]] = True
    return mask.reshape(score.shape)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.07])
def test_principal_mask_matches_reference(alpha):
    rng = np.random.default_rng(8)
    W0 = rng.standard_normal((3, 20, 10))  # 200 entries: alpha * 200 an integer for each alpha
    svd = exact_svd(torch.tensor(W0))
    r = 4
    got = M.principal_mask(svd.U, svd.S, svd.V, r, alpha)
    for i in range(3):
        U, s, Vh = sl.svd(W0[i], full_matrices=False)
        ref = _top_fraction_ref(np.abs((U[:, :r] * s[:r]) @ Vh[:r]), alpha)
        assert got[i].sum().item() == round(alpha * 200)
        np.testing.assert_array_equal(got[i].numpy(), ref)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.07])
def test_lowmag_mask_matches_reference(alpha):
    rng = np.random.default_rng(9)
    W0 = rng.standard_normal((3, 20, 10)).astype(np.float32)
    got = M.lowmag_mask(torch.tensor(W0), alpha)
    for i in range(3):
        assert got[i].sum().item() == round(alpha * 200)
        np.testing.assert_array_equal(got[i].numpy(), _top_fraction_ref(-np.abs(W0[i]), alpha))


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.07, 0.999])
def test_mask_selection_equals_stable_sort_on_ties(alpha):
    # bf16 weights tie often: few distinct values, zeros of both signs; the selection (kthvalue plus
    # position order among the ties) must give the stable sort's mask bit for bit, and NaN takes the sort
    rng = np.random.default_rng(10)
    W0 = torch.tensor(rng.integers(-6, 7, size=(4, 30, 17)) * 0.125, dtype=torch.bfloat16).float()
    W0[0, 0, :5] = -0.0
    for score in (W0.abs(), -W0.abs(), W0):
        count = math.ceil(alpha * 510 * (1 - 1e-12))
        got = M._top_fraction(score, alpha)
        np.testing.assert_array_equal(got.numpy(), M._top_fraction_sorted(score, count).numpy())
        assert (got.sum((-2, -1)) == count).all()
        for i in range(4):
            np.testing.assert_array_equal(got[i].numpy(), _top_fraction_ref(score[i].numpy(), alpha))
    W0[1, 2, 3] = math.nan
    np.testing.assert_array_equal(M._top_fraction(W0, alpha).numpy(), M._top_fraction_sorted(W0, count).numpy())


@pytest.mark.parametrize("alpha", [0.3, 0.07, 0.999])
@pytest.mark.parametrize("kind", ["normal", "bf16 ties", "constant", "nan", "bounds miss"])
def test_mask_selection_in_bands_equals_the_stable_sort(kind, alpha, monkeypatch):
    # the score given 7 rows at a time, never whole: the same mask as the stable sort of the whole score, ties
    # taken in position order across bands; NaN, and bounds that miss the threshold, take the whole score
    rng = np.random.default_rng(12)
    L, m, n = 2, 300, 170
    score = {"normal": rng.standard_normal((L, m, n)),
             "bf16 ties": torch.tensor(rng.integers(-6, 7, size=(L, m, n)) * 0.125, dtype=torch.bfloat16).double(),
             "constant": np.full((L, m, n), 0.5),
             "nan": np.where(rng.random((L, m, n)) < 1e-3, np.nan, rng.standard_normal((L, m, n))),
             "bounds miss": rng.standard_normal((L, m, n))}[kind]
    score = torch.as_tensor(score, dtype=torch.float64)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)
    if kind == "bounds miss":
        monkeypatch.setattr(M, "_bounds", lambda sample, k, total: (math.inf, math.inf))
    seen, whole = [], []
    monkeypatch.setattr(M, "_top_fraction", lambda s, a, f=M._top_fraction: whole.append(s.shape) or f(s, a))

    buffer = Scratch()

    def bands(rows):  # every band in one buffer, as principal_mask gives them: valid until the next
        seen.append(rows.stop - rows.start)
        part = score[..., rows, :]
        return buffer.take(tuple(part.shape)).copy_(part)

    got = M._top_fraction_banded(bands, m, n, alpha)
    count = math.ceil(alpha * m * n * (1 - 1e-12))
    np.testing.assert_array_equal(got.numpy(), M._top_fraction_sorted(score, count).numpy())
    assert max(seen) == 7 and bool(whole) == (kind in ("nan", "bounds miss"))  # whole only where it must


def test_principal_mask_of_rank_one_base_is_its_support():
    # W0 = a b^T with a nonzero on the first half of the rows only: exactly half the entries are nonzero,
    # so the top-half principal mask is those rows, whatever the reconstruction rank.
    rng = np.random.default_rng(10)
    m, n = 16, 12
    a = np.concatenate([1 + rng.random(m // 2), np.zeros(m // 2)])
    b = (1 + rng.random(n)) * rng.choice([-1, 1], n)
    W0 = torch.tensor(np.outer(a, b))
    svd = exact_svd(W0)
    expected = np.zeros((m, n), dtype=bool)
    expected[: m // 2] = True
    for r in (1, min(64, n)):
        np.testing.assert_array_equal(M.principal_mask(svd.U, svd.S, svd.V, r).numpy(), expected)


def test_principal_and_lowmag_masks_are_complements_for_rank_one_base():
    rng = np.random.default_rng(11)
    W0 = torch.tensor(np.outer(rng.standard_normal(14), rng.standard_normal(10)))  # even count, no ties
    svd = exact_svd(W0)
    principal = M.principal_mask(svd.U, svd.S, svd.V, 1)
    torch.testing.assert_close(principal, ~M.lowmag_mask(W0))


def test_mask_overlap_of_planted_masks():
    update = torch.zeros(2, 10, 10, dtype=torch.bool)
    reference = torch.zeros(2, 10, 10, dtype=torch.bool)
    update[0, 0, :8] = True  # 8 changed entries, 2 of them in the reference
    reference[0, 0, 6:] = True
    reference[0, 5] = True  # reference entries outside the update do not count
    update[1, :4, :5] = True  # 20 changed entries, all in the reference
    reference[1, :5, :5] = True
    got = M.mask_overlap(update, reference)
    np.testing.assert_allclose(got.numpy(), [2 / 8, 1.0])
    assert math.isnan(M.mask_overlap(torch.zeros(4, 4, dtype=torch.bool), reference[0, :4, :4]).item())


# --- 6. rank of the update ---------------------------------------------------------------------

def _rank_ref(s: np.ndarray) -> dict[str, float]:
    """SPEC item 6 written out directly."""
    e = s ** 2
    p = s / s.sum()
    p = p[p > 0]
    cum = np.cumsum(e) / e.sum()
    return {
        "stable_rank": e.sum() / e[0],
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "r90": int(np.argmax(cum >= 0.9)) + 1,
        "r99": int(np.argmax(cum >= 0.99)) + 1,
        "fro_norm": math.sqrt(e.sum()),
        "hill_alpha": 1.0 / np.mean(np.log(s[:9] / s[9])) if len(s) >= 10 else math.nan,
    }


def test_rank_stats_match_reference_batched():
    rng = np.random.default_rng(12)
    s = np.sort(rng.random((4, 30)) ** 3)[:, ::-1].copy()
    got = M.rank_stats(torch.tensor(s))
    for i in range(4):
        for name, value in _rank_ref(s[i]).items():
            assert getattr(got, name)[i].item() == pytest.approx(value, rel=1e-12), name


def test_rank_stats_of_flat_spectrum():
    r = 5
    s = torch.tensor([1.0] * r + [0.0] * 15, dtype=torch.float64)
    got = M.rank_stats(s)
    assert got.stable_rank.item() == pytest.approx(r, rel=1e-14)
    assert got.effective_rank.item() == pytest.approx(r, rel=1e-14)
    assert got.r90.item() == 5 and got.r99.item() == 5
    assert got.fro_norm.item() == pytest.approx(math.sqrt(r))
    ten = M.rank_stats(torch.ones(10, dtype=torch.float64))
    assert ten.r90.item() == 9 and ten.r99.item() == 10  # 9/10 of the energy reaches 0.9 exactly


def test_rank_stats_of_geometric_spectrum_match_closed_forms():
    q, n = 0.9, 60
    s = torch.tensor(q ** np.arange(n))
    got = M.rank_stats(s)
    # stable rank: sum q^(2i) = (1 - q^(2n)) / (1 - q^2)
    assert got.stable_rank.item() == pytest.approx((1 - q ** (2 * n)) / (1 - q * q), rel=1e-12)
    # effective rank: p_i = q^i / Z, H = log Z - log(q) * sum_i i p_i
    Z = (1 - q ** n) / (1 - q)
    mean_i = q * (1 - n * q ** (n - 1) + (n - 1) * q ** n) / (1 - q) ** 2 / Z
    assert got.effective_rank.item() == pytest.approx(math.exp(math.log(Z) - math.log(q) * mean_i), rel=1e-12)
    # r_level: smallest r with (1 - q^(2r)) / (1 - q^(2n)) >= level
    for name, level in (("r90", 0.9), ("r99", 0.99)):
        expected = math.ceil(math.log(1 - level * (1 - q ** (2 * n))) / (2 * math.log(q)))
        assert getattr(got, name).item() == expected
    # Hill: log(s_i / s_10) = (10 - i) log(1/q), mean over i = 1..9 is 5 log(1/q)
    assert got.hill_alpha.item() == pytest.approx(1 / (5 * math.log(1 / q)), rel=1e-12)


def test_hill_alpha_of_power_law_spectrum():
    # s_i = i^(-1/a): log(s_i / s_10) = log(10 / i) / a, so alpha_hat = a / (log 10 - log(9!) / 9)
    a = 2.0
    s = torch.tensor(np.arange(1, 41, dtype=np.float64) ** (-1 / a))
    expected = a / (math.log(10) - math.log(math.factorial(9)) / 9)
    assert M.rank_stats(s).hill_alpha.item() == pytest.approx(expected, rel=1e-12)
    # fewer than 10 values: the tail is the last one
    short = torch.tensor(np.arange(1, 7, dtype=np.float64) ** (-1 / a))
    expected_short = a / (math.log(6) - math.log(math.factorial(5)) / 5)
    assert M.rank_stats(short).hill_alpha.item() == pytest.approx(expected_short, rel=1e-12)


def test_rank_of_planted_rank_5_matrix():
    rng = np.random.default_rng(13)
    D = torch.tensor(rng.standard_normal((3, 80, 5)) @ rng.standard_normal((3, 5, 60)))  # (3, 80, 60) rank 5
    got = M.rank_stats(spectrum(D, small_values=False))  # the engine's path for updates
    assert (got.r90 <= 5).all() and (got.r99 <= 5).all()
    assert (got.stable_rank <= 5).all()
    assert (got.effective_rank <= 5 + 1e-6).all()
    for i in range(3):
        ref = _rank_ref(sl.svdvals(D[i].numpy())[:5])  # the exact nonzero spectrum
        for name in ("stable_rank", "effective_rank", "fro_norm"):
            assert getattr(got, name)[i].item() == pytest.approx(ref[name], rel=1e-6), name


def test_rank_stats_of_zero_update_are_nan_but_norm():
    got = M.rank_stats(torch.zeros(2, 12, dtype=torch.float64))
    assert (got.fro_norm == 0).all()
    for name in ("stable_rank", "effective_rank", "r90", "r99", "hill_alpha"):
        assert torch.isnan(getattr(got, name)).all(), name


# --- 8. intruder dimensions --------------------------------------------------------------------

def _tall_base(rng: np.random.Generator, m: int = 60, n: int = 30):
    """W0 = U S V^T with U (m, n) leaving an orthogonal complement in R^m for fresh directions."""
    Q = _orthonormal(rng, m, m)
    U, fresh = Q[:, :n], Q[:, n:]
    s = np.linspace(4, 1, n)
    return U, s, _orthonormal(rng, n, n), fresh


def _intruders_of(U0_full: np.ndarray, Ut: np.ndarray, s: np.ndarray, V: np.ndarray) -> float:
    """Run the metric the engine's way: SVDs of W0 and W_t, top-10 vectors of W_t."""
    b0 = exact_svd(torch.tensor((U0_full * s) @ V.T))
    bt = exact_svd(torch.tensor((Ut * s) @ V.T), 10)
    return M.intruders(b0.U, bt.U).item()


def test_intruders_count_a_planted_fresh_direction():
    rng = np.random.default_rng(14)
    U, s, V, fresh = _tall_base(rng)
    assert _intruders_of(U, U, s, V) == 0
    Ut = U.copy()
    Ut[:, 2] = fresh[:, 0]  # the third singular direction replaced by one no singular vector of W0 has
    assert _intruders_of(U, Ut, s, V) == 1
    Ut[:, 7] = fresh[:, 1]
    assert _intruders_of(U, Ut, s, V) == 2
    Ut = U.copy()
    Ut[:, 20] = fresh[:, 0]  # outside the top 10 of W_t: not counted
    assert _intruders_of(U, Ut, s, V) == 0


@pytest.mark.parametrize("degrees, count", [(50.0, 0), (70.0, 1)])
def test_intruders_threshold_is_cos_one_half(degrees, count):
    # a top direction rotated by phi towards a fresh one keeps |cos| = cos(phi) with its old self: 0.5 at 60 deg
    rng = np.random.default_rng(15)
    U, s, V, fresh = _tall_base(rng)
    phi = math.radians(degrees)
    Ut = U.copy()
    Ut[:, 0] = math.cos(phi) * U[:, 0] + math.sin(phi) * fresh[:, 0]
    assert _intruders_of(U, Ut, s, V) == count


def test_intruders_from_top_vectors_decide_or_say_undecided():
    # complete=False: only W0's top p vectors; a direction is decided by them, or the matrix is NaN
    rng = np.random.default_rng(17)
    U, s, V, fresh = _tall_base(rng)  # U: 30 left vectors in R^60, fresh: their orthogonal complement
    p = 12
    top = torch.tensor(U[:, :p])
    Ut = U[:, :10].copy()
    assert M.intruders(top, torch.tensor(Ut), complete=False).item() == 0  # each is one of the top p
    # inside span(top p), |cos| < 0.5 with each: decided an intruder by the energy left outside (0 < 0.25)
    Ut[:, 3] = U[:, :p] @ np.full(p, 1 / math.sqrt(p))
    Ut[:, 3] -= Ut[:, :3] @ (Ut[:, :3].T @ Ut[:, 3])
    Ut[:, 3] /= np.linalg.norm(Ut[:, 3])
    got = M.intruders(top, torch.tensor(Ut), complete=False).item()
    assert got == M.intruders(torch.tensor(U), torch.tensor(Ut)).item() == 1
    # a fresh direction: cos 0 with the top p and energy 1 outside: whether it meets a later vector of W0 is
    # unknown from the top p, so undecided; against all of W0's vectors it counts
    Ut[:, 7] = 0.9 * fresh[:, 0] + math.sqrt(1 - 0.81) * U[:, 20]
    assert math.isnan(M.intruders(top, torch.tensor(Ut), complete=False).item())
    assert M.intruders(torch.tensor(U), torch.tensor(Ut)).item() == 2
    # ... and when it leans on a later vector (|cos| 0.8 with u_20), the full count does not take it
    Ut[:, 7] = 0.6 * fresh[:, 0] + 0.8 * U[:, 20]
    assert math.isnan(M.intruders(top, torch.tensor(Ut), complete=False).item())
    assert M.intruders(torch.tensor(U), torch.tensor(Ut)).item() == 1


def test_intruders_match_reference_batched():
    rng = np.random.default_rng(16)
    U0 = np.stack([_orthonormal(rng, 20, 20) for _ in range(3)])
    Ut = np.stack([_orthonormal(rng, 20, 10) for _ in range(3)])
    got = M.intruders(torch.tensor(U0), torch.tensor(Ut))
    for i in range(3):
        ref = (np.abs(U0[i].T @ Ut[i]).max(axis=0) < 0.5).sum()
        assert got[i].item() == ref
    assert got.sum() > 0  # random directions in R^20 do look like intruders


# --- batching ----------------------------------------------------------------------------------

def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(3, 24, 16, generator=gen) * 0.1
    wt = w0 + torch.randn(3, 24, 16, generator=gen) * 1e-3
    svd = exact_svd(w0)
    return w0, wt, svd


BATCHED = {
    "sparsity_bf16": lambda w0, wt, svd: M.sparsity_bf16(w0, wt),
    "sparsity_abs": lambda w0, wt, svd: M.sparsity_abs(w0, wt, 1e-3),
    "angle_stats": lambda w0, wt, svd: torch.stack(M.angle_stats(svd.U[..., :4], exact_svd(wt, 4).U)[:2]),
    "nss": lambda w0, wt, svd: M.nss(svd.S, exact_svd(wt).S),
    "overlap": lambda w0, wt, svd: torch.stack(M.overlap(wt - w0, svd.U[..., :4], svd.V[..., :4])),
    "principal_mask": lambda w0, wt, svd: M.principal_mask(svd.U, svd.S, svd.V, 3),
    "lowmag_mask": lambda w0, wt, svd: M.lowmag_mask(w0),
    "mask_overlap": lambda w0, wt, svd: M.mask_overlap(M.changed_mask(w0, wt), M.lowmag_mask(w0)),
    "rank_stats": lambda w0, wt, svd: torch.stack(M.rank_stats(exact_svd(wt - w0).S)),
    "intruders": lambda w0, wt, svd: M.intruders(svd.U, exact_svd(wt, 10).U),
    "subspace_sim": lambda w0, wt, svd: M.subspace_sim(svd.V[..., :4], exact_svd(wt, 4).V),
}


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_batched_equals_per_matrix(name):
    w0, wt, svd = _inputs(17)
    fn = BATCHED[name]
    batched = fn(w0, wt, svd)
    batch_axis = 0 if batched.shape[0] == 3 else 1  # stacked NamedTuple fields put the batch second
    for i in range(3):
        single = fn(w0[i], wt[i], exact_svd(w0[i]))
        torch.testing.assert_close(batched.select(batch_axis, i), single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["normal", "bf16 ties", "sorted", "constant", "outliers"])
@pytest.mark.parametrize("frac", [1e-6, 0.3, 0.7, 1.0])
def test_selection_is_exact_on_large_arrays(kind, frac):
    """The bracketed selection gives introselect's k-th largest, and takes the whole array where its sample
    brackets nothing (a constant array, a value held by most entries)."""
    rng = np.random.default_rng(11)
    n = 300_007
    a = {"normal": rng.standard_normal(n),
         "bf16 ties": torch.tensor(rng.standard_normal(n) * 0.02, dtype=torch.bfloat16).float().numpy(),
         "sorted": np.arange(n, dtype=np.float64),
         "constant": np.full(n, 0.5),
         "outliers": np.where(rng.random(n) < 0.999, 0.0, rng.standard_normal(n) * 1e6)}[kind]
    k = max(1, math.ceil(frac * n))
    want = np.partition(a, n - k)[n - k]
    assert M._select(a, k) == want
    fast = M._bracketed(a, k)
    assert fast is None or fast == want
    if kind in ("normal", "sorted") and frac in (0.3, 0.7):  # the masks' fractions; the extremes may fall back
        assert fast == want  # the sample did bracket it: the fast path is what ran
