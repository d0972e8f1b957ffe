"""geometry.lab.stats: the paired t-test against scipy, Holm against a plain step-down, and the decision rule
on simulated per-seed data (its error rate under no difference, its power at a planted difference)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from geometry.lab import stats as S
from geometry.lab.stats import Interval, Pair, decide, differences, holm, interval, t_test, verdict

HOLDS, REVERSED, UNDECIDED = S.HOLDS, S.REVERSED, S.UNDECIDED
REPRODUCED, CONTRADICTED, PARTLY, INCONCLUSIVE = S.REPRODUCED, S.CONTRADICTED, S.PARTLY, S.INCONCLUSIVE


def test_interval_is_the_student_t_interval():
    iv = interval([1.0, 2.0, 3.0, math.nan])  # non-finite values dropped
    assert iv.mean == 2.0 and iv.n == 3 and iv.hi - iv.mean == pytest.approx(4.302653 / 3**0.5)
    assert interval([5.0]) == (5.0, *interval([5.0])[1:3], 1) and math.isnan(interval([5.0]).lo)
    assert interval([]).n == 0 and Interval(1, 0.5, 1.5, 3).scaled(100) == (100, 50, 150, 3)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_paired_t_test_matches_scipy(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        a, b = rng.normal(size=n), rng.normal(size=n) + rng.normal()
        iv, p = t_test(list(a - b))
        want = sps.ttest_rel(a, b)
        assert p == pytest.approx(want.pvalue, rel=1e-9)
        ci = want.confidence_interval(0.95)
        assert (iv.mean, iv.lo, iv.hi) == pytest.approx((np.mean(a - b), ci.low, ci.high), rel=1e-9)


def test_one_sample_against_a_constant_matches_scipy():
    x = {0: 0.93, 1: 0.95, 2: 0.91, 3: 0.97}
    iv, p = t_test(list(differences(x, 0.9).values()))
    assert p == pytest.approx(sps.ttest_1samp(list(x.values()), 0.9).pvalue, rel=1e-9)
    assert iv.mean == pytest.approx(0.04)
    assert differences(0.9, x) == pytest.approx({s: 0.9 - v for s, v in x.items()})


def test_t_test_edge_cases():
    assert math.isnan(t_test([1.0])[1]) and t_test([1.0])[0].n == 1  # one seed decides nothing
    assert t_test([0.5, 0.5, 0.5])[1] == 0.0  # the same nonzero difference on every seed
    assert math.isnan(t_test([0.0, 0.0])[1])  # no difference at all
    assert t_test([1.0, math.inf, 1.2, math.nan])[0].n == 2


def test_pairs_are_matched_by_seed():
    high, low = {2: 5.0, 0: 3.0, 1: 4.0, 7: 1.0}, {0: 1.0, 1: 1.5, 2: 2.0, 9: 0.0}
    assert differences(high, low) == {2: 3.0, 0: 2.0, 1: 2.5}  # seeds 7 and 9 have no partner


def _holm_reject(ps, alpha):
    """Holm (1979), written out: test p-values from the smallest; reject while p_(i) <= alpha / (m - i)."""
    m, reject = len(ps), [False] * len(ps)
    for i, j in enumerate(sorted(range(m), key=lambda j: ps[j])):
        if ps[j] > alpha / (m - i):
            break
        reject[j] = True
    return reject


def test_holm_matches_the_step_down_procedure():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    rng = np.random.default_rng(1)
    for _ in range(500):
        m = int(rng.integers(1, 6))
        ps = list(rng.uniform(0, 0.2, m) ** 2)
        adjusted = holm(ps)
        for alpha in (0.01, 0.05, 0.1):
            assert [q <= alpha for q in adjusted] == _holm_reject(ps, alpha)
    out = holm([0.01, math.nan, 0.02])  # an untestable pair stays undecided and counts in m
    assert out[0] == pytest.approx(0.03) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


def test_status_follows_the_sign_and_the_corrected_p():
    up = {s: 1.0 + 0.01 * s for s in range(5)}
    down = {s: -1.0 - 0.01 * s for s in range(5)}
    noise = {s: v for s, v in enumerate([0.3, -0.2, 0.1, -0.4, 0.25])}
    zero = dict.fromkeys(range(5), 0.0)
    got = decide([Pair("a > b", up, zero), Pair("c > d", down, zero), Pair("e > f", noise, zero)])
    assert [r.status for r in got] == [HOLDS, REVERSED, UNDECIDED]
    assert all(r.p_holm >= r.p for r in got) and got[0].diff.mean == pytest.approx(1.02)
    assert decide([Pair("one seed", {0: 5.0}, 0.0)])[0].status == UNDECIDED


def test_verdict_from_pairs():
    assert verdict([HOLDS, HOLDS]) == REPRODUCED
    assert verdict([HOLDS, UNDECIDED]) == PARTLY
    assert verdict([HOLDS, REVERSED]) == verdict([UNDECIDED, REVERSED]) == CONTRADICTED
    assert verdict([UNDECIDED, UNDECIDED]) == verdict([]) == INCONCLUSIVE


def _chain_claims(rng, n_claims: int, shift: float, seeds: int = 5) -> list[str]:
    """Verdicts of the claim SFT < OPD < RLVR on simulated runs: regime means 0, shift, 2 shift; each run's
    value at a seed has noise of sd 1 of its own plus a seed effect (sd 2) that runs of one seed share."""
    out = []
    for _ in range(n_claims):
        seed_effect = rng.normal(0, 2, seeds)
        v = {r: dict(enumerate(seed_effect + i * shift + rng.normal(size=seeds))) for i, r in enumerate("sor")}
        out.append(verdict([p.status for p in decide([Pair("SFT < OPD", v["o"], v["s"]),
                                                      Pair("OPD < RLVR", v["r"], v["o"])])]))
    return out


def test_no_difference_decides_at_most_5_percent_of_claims():
    """Holm keeps the family-wise rate at 5%: a claim is decided (any pair holds or is reversed) in at most
    5% of simulations, within two standard errors of the simulation (2 x 0.34% at 4000)."""
    n = 4000
    decided = sum(v != INCONCLUSIVE for v in _chain_claims(np.random.default_rng(0), n, 0.0)) / n
    assert decided <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / n)


def test_a_three_sd_difference_at_5_seeds_is_decided():
    """Regimes 3 sd apart (sd: one run's spread over seeds), 5 seeds: both pairs hold in >= 80% of simulations,
    and the claim is never read backwards."""
    verdicts = _chain_claims(np.random.default_rng(1), 1000, 3.0)
    assert sum(v == REPRODUCED for v in verdicts) / len(verdicts) >= 0.8
    assert CONTRADICTED not in verdicts
