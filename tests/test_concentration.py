"""docs/metrics.md items 11 and 12 (geometry.concentration) against plain numpy references on planted updates:
the sparsity ladders and top-entry energies exact whatever the bands, the singular-value energies, and the
signal rank of planted low-rank-plus-noise updates of known rank."""

import math

import numpy as np
import pytest
import torch
from concentration_ref import entry_reference, spectral_reference

import geometry.concentration as C
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, measure_step

ENTRY = [f"sparsity_abs_{t}" for t in C.ABS_TOLS] + [f"sparsity_rel_{t}" for t in C.REL_TOLS] + \
    [f"energy_top_{p}" for p, _ in C.TOP_ENTRIES]


def _ladder_update(rng: np.random.Generator, L: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """W0 of three scales and updates with |D| log-uniform over 1e-10..1e-2 (every rung of both ladders
    non-trivial), a fifth of the entries exactly zero."""
    W0 = rng.standard_normal((L, m, n)) * np.array([0.02, 0.05, 0.2])[:L, None, None]
    D = np.sign(rng.standard_normal((L, m, n))) * 10.0 ** rng.uniform(-10, -2, (L, m, n))
    D[rng.random((L, m, n)) < 0.2] = 0.0
    return W0, D


def _check(got: dict[str, torch.Tensor], W0: np.ndarray, D: np.ndarray) -> None:
    assert set(got) == set(ENTRY)
    for i in range(D.shape[0]):
        ref = entry_reference(W0[i], D[i])
        for name in ENTRY:
            if name.startswith("sparsity"):
                assert got[name][i].item() == ref[name], name  # counts: exact
            else:
                assert got[name][i].item() == pytest.approx(ref[name], rel=1e-12), name


def test_entry_metrics_match_numpy_on_a_planted_ladder():
    W0, D = _ladder_update(np.random.default_rng(0), 3, 60, 50)
    got = C.entry_metrics(torch.from_numpy(W0), torch.from_numpy(D))
    for rung in ENTRY[:7]:
        assert 0.25 < got[rung].min() and got[rung].max() < 0.97, rung  # each rung between its neighbours
    _check(got, W0, D)


@pytest.mark.parametrize("sample", [C.SAMPLE, 256])  # 256: the sampled bound taken at this size
@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_tally_in_bands_is_exact_whatever_the_order_and_the_cuts(order, sample, monkeypatch):
    # bands of uneven height, some fed as transposed views (a wide matrix's blocks); magnitudes sorted along the
    # rows raise the candidates' bound at every band (ascending) or never (descending)
    monkeypatch.setattr(C, "SAMPLE", sample)
    rng = np.random.default_rng(1)
    W0, D = _ladder_update(rng, 2, 300, 80)
    if order != "random":
        a = np.sort(np.abs(D).reshape(2, -1), axis=1)
        D = (a if order == "ascending" else a[:, ::-1]).reshape(D.shape) * np.sign(rng.standard_normal(D.shape))
    Dt = torch.from_numpy(D)
    tally = C.Tally(torch.linalg.matrix_norm(torch.from_numpy(W0)), 300, 80)
    cuts = np.unique(np.concatenate([[0, 300], rng.integers(1, 300, 25)]))
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        band = Dt[:, a:b]
        tally.add(band.mT.contiguous().mT if i % 2 else band)  # a transposed view, or rows as they are
    _check(tally.values(), W0, D)


def test_top_energy_with_ties_at_the_threshold_is_exact():
    # a quantised update (bf16-like steps): hundreds of entries tie at the value of the 150th largest
    rng = np.random.default_rng(2)
    q = 1e-4
    D = q * rng.integers(-3, 4, (1, 60, 50)).astype(np.float64)
    W0 = rng.standard_normal((1, 60, 50))
    got = C.entry_metrics(torch.from_numpy(W0), torch.from_numpy(D))
    assert (np.abs(D) == 3 * q).sum() > 150
    total = (D ** 2).sum()
    assert got["energy_top_5pct"].item() == pytest.approx(150 * (3 * q) ** 2 / total, rel=1e-13)
    assert got["energy_top_0.1pct"].item() == pytest.approx(3 * (3 * q) ** 2 / total, rel=1e-13)
    _check(got, W0, D)


def test_a_zero_update_is_sparse_everywhere_and_has_no_energy_shares():
    got = C.entry_metrics(torch.randn(2, 30, 20), torch.zeros(2, 30, 20, dtype=torch.float64))
    for name in ENTRY[:7]:
        assert (got[name] == 1).all()
    for name in ENTRY[7:]:
        assert got[name].isnan().all()
    s = torch.zeros(2, 20, dtype=torch.float64)
    assert all(v.isnan().all() for v in C.spectral_metrics(s, 30).values())


def test_top_counts_are_ceilings_in_integers():
    assert C._top_counts(3000) == [3, 30, 150]
    assert C._top_counts(3001) == [4, 31, 151]
    assert C._top_counts(7) == [1, 1, 1]


# --- singular-value energies and signal rank ---------------------------------------------------

def _low_rank_plus_noise(rng, m: int, n: int, s: list[float], noise: float = 1.0) -> np.ndarray:
    r = len(s)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return (U * s) @ V.T + noise * rng.standard_normal((m, n))


def test_gd_omega_matches_the_papers_values():
    # Gavish & Donoho 2014: the exact omega(1) = lambda*(1) / sqrt(mu_1) is 2.858; their cubic gives 2.86
    assert C.gd_omega(1.0) == pytest.approx(2.858, abs=3e-3)
    assert C.gd_omega(0.5) == pytest.approx(2.1725, abs=1e-12)


@pytest.mark.parametrize("shape", [(200, 100), (100, 200), (64, 64), (90, 31)])
def test_spectral_metrics_match_numpy(shape):
    rng = np.random.default_rng(3)
    D = np.stack([_low_rank_plus_noise(rng, *shape, [40, 30, 20, 12, 9], noise=0.5) for _ in range(3)])
    s = torch.linalg.svdvals(torch.from_numpy(D))  # (3, r)
    got = C.spectral_metrics(s, max(shape))
    for i in range(3):
        ref = spectral_reference(D[i])
        assert set(got) == set(ref)
        for name, value in ref.items():
            assert got[name][i].item() == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert (got["sv_energy_top_64"] == 1).all() == (min(shape) <= 64)  # J capped at the rank


@pytest.mark.parametrize("seed", range(5))
def test_signal_rank_of_a_planted_rank_5_update_is_5_and_of_pure_noise_0(seed):
    # 200 x 100 Gaussian noise (bulk edge ~ sqrt(200) + sqrt(100) = 24.1), a rank-5 signal at 3-6x the edge
    rng = np.random.default_rng(seed)
    signal = [150, 130, 110, 90, 75]
    D = _low_rank_plus_noise(rng, 200, 100, signal)
    noise = rng.standard_normal((200, 100))
    for x, rank in ((D, 5), (D.T, 5), (noise, 0), (noise.T, 0)):
        r, e = C.signal(torch.linalg.svdvals(torch.from_numpy(x)), 200)
        assert r.item() == rank
        ref = spectral_reference(x)
        assert e.item() == pytest.approx(ref["signal_energy"], rel=1e-12, abs=1e-15)
    share = sum(v * v for v in signal) / (D ** 2).sum()  # the planted share; noise along them adds a little
    assert share < C.signal(torch.linalg.svdvals(torch.from_numpy(D)), 200)[1].item() < 1.05 * share


def test_an_exactly_low_rank_update_has_its_rank_as_signal_rank():
    # median over all min(m, n) values, zeros included: rank 3 of 40 has median 0, every nonzero value is signal
    rng = np.random.default_rng(4)
    D = _low_rank_plus_noise(rng, 60, 40, [3.0, 2.0, 1.0], noise=0.0)
    s = torch.linalg.svdvals(torch.from_numpy(D))
    s = torch.where(s > 1e-12, s, torch.zeros_like(s))  # the resolved spectrum (exact zeros past the rank)
    r, e = C.signal(s, 60)
    assert r.item() == 3 and e.item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("quick", [True, False])
def test_the_engine_gives_the_signal_rank_of_a_planted_update(quick):
    # through measure_step: W0 + a rank-5 signal in noise; the update's spectrum from its Gram matrix
    rng = np.random.default_rng(5)
    W0 = rng.standard_normal((1, 200, 100)) * 0.05
    D = 1e-3 * _low_rank_plus_noise(rng, 200, 100, [150, 130, 110, 90, 75])
    cfg = AnalysisConfig(principal_k=6, lock_k=4, mask_rank=8, device="cpu", quick=quick)
    W0t, Wt = torch.from_numpy(W0), torch.from_numpy(W0 + D)
    v = measure_step(decompose_base(W0t, cfg), Wt, W0t, cfg).values
    ref = entry_reference(W0[0], (W0 + D)[0] - W0[0]) | spectral_reference((W0 + D)[0] - W0[0])
    assert v["signal_rank"].item() == 5
    for name, value in ref.items():
        assert v[name].item() == pytest.approx(value, rel=1e-10), name
    if not quick:  # the first checkpoint's interval update is the cumulative one
        assert v["signal_rank_interval"].item() == 5
        assert math.isclose(v["signal_energy_interval"].item(), v["signal_energy"].item(), rel_tol=1e-12)
