"""How the study decides a claim from a few training seeds (SPEC "How the study decides").

A claim is a set of orderings ("pairs"), each stated in the paper's direction: side ``high`` above side ``low``.
A side is a regime's per-seed values or a constant (a threshold). Each pair is decided by a two-sided paired
t-test over seeds on high - low (runs of one seed share data order and prompts, so they pair up; a constant
makes it a one-sample test), with Holm's step-down correction over the claim's pairs, family-wise 5%:

- **holds**: significant after Holm, in the paper's direction (mean difference > 0);
- **reversed**: significant after Holm, against it;
- **undecided**: otherwise, and always with fewer than 2 seeds paired.

A claim's verdict from its pairs: **reproduced** (all hold), **contradicted** (any reversed), **partly**
(some hold, the rest undecided), **inconclusive** (none decided).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import special

from geometry.offline.markdown import fmt

ALPHA = 0.05  # family-wise error rate of one claim's pairs (Holm)
HOLDS, REVERSED, UNDECIDED = "holds", "reversed", "undecided"
REPRODUCED, CONTRADICTED, PARTLY, INCONCLUSIVE = "reproduced", "contradicted", "partly", "inconclusive"
VERDICTS = (REPRODUCED, PARTLY, CONTRADICTED, INCONCLUSIVE)

Side = Mapping[int, float] | float  # per-seed values by seed, or a constant


class Interval(NamedTuple):
    """Mean over seeds and its 95% Student-t interval (NaN bounds with one seed)."""

    mean: float
    lo: float
    hi: float
    n: int

    def show(self, kind: str = "g") -> str:
        if self.n < 2:
            return f"{fmt(self.mean, kind)} (1 seed)" if self.n else "n/a"
        return f"{fmt(self.mean, kind)} [{fmt(self.lo, kind)}, {fmt(self.hi, kind)}]"

    def scaled(self, c: float) -> Interval:
        """The interval of c * x (c > 0)."""
        return Interval(c * self.mean, c * self.lo, c * self.hi, self.n)


def interval(values: Sequence[float]) -> Interval:
    """Mean of the finite values and its 95% Student-t interval."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if v.size == 1:
        return Interval(float(v[0]), math.nan, math.nan, 1)
    half = special.stdtrit(v.size - 1, 0.975) * v.std(ddof=1) / math.sqrt(v.size)
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))


def t_test(d: Sequence[float]) -> tuple[Interval, float]:
    """Two-sided one-sample t-test of mean(d) = 0: the mean with its 95% interval, and p.

    On paired differences this is the paired t-test (scipy.stats.ttest_rel). Non-finite values are dropped;
    fewer than 2 left: p = NaN. Differences all equal and nonzero: p = 0 (t is infinite); all zero: p = NaN.
    """
    v = np.array([x for x in d if math.isfinite(x)], dtype=float)
    iv = interval(v)
    if v.size < 2:
        return iv, math.nan
    se = v.std(ddof=1) / math.sqrt(v.size)
    if se == 0:
        return iv, 0.0 if v.mean() != 0 else math.nan
    t = v.mean() / se
    return iv, float(2 * special.stdtr(v.size - 1, -abs(t)))  # Student-t tails


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sorted ascending, p_(i) times (m - i + 1),
    running maximum, capped at 1. A pair is significant at family-wise level a iff its adjusted p <= a.
    NaN (an untestable pair) stays NaN and still counts in m."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: (math.isnan(ps[i]), ps[i]))
    out, running = [math.nan] * m, 0.0
    for rank, i in enumerate(order):
        if math.isnan(ps[i]):
            break
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def differences(high: Side, low: Side) -> dict[int, float]:
    """high - low by seed, over the seeds both sides have (a constant side pairs with every seed)."""
    if isinstance(high, Mapping) and isinstance(low, Mapping):
        return {s: high[s] - low[s] for s in high if s in low}
    if isinstance(high, Mapping):
        return {s: v - low for s, v in high.items()}
    if isinstance(low, Mapping):
        return {s: high - v for s, v in low.items()}
    raise ValueError("a pair needs per-seed values on at least one side")


class Pair(NamedTuple):
    """One ordering of a claim, in the paper's direction: ``high`` above ``low``."""

    text: str  # e.g. "SFT < OPD"
    high: Side  # the side the paper puts higher (per-seed values or a constant)
    low: Side


class PairResult(NamedTuple):
    """A pair decided: the paired difference high - low (positive: the paper's direction)."""

    text: str
    diff: Interval  # mean paired difference over seeds and its 95% t interval
    p: float  # two-sided paired t-test
    p_holm: float  # Holm-adjusted over the claim's pairs
    status: str  # HOLDS, REVERSED or UNDECIDED


def status(diff: Interval, p_holm: float, alpha: float = ALPHA) -> str:
    if not p_holm <= alpha:  # NaN included
        return UNDECIDED
    return HOLDS if diff.mean > 0 else REVERSED


def decide(pairs: Sequence[Pair], alpha: float = ALPHA) -> list[PairResult]:
    """Every pair of one claim tested, Holm-corrected over the claim, and given its status."""
    tested = [t_test(list(differences(p.high, p.low).values())) for p in pairs]
    adjusted = holm([p for _, p in tested])
    return [PairResult(pair.text, iv, p, ph, status(iv, ph, alpha))
            for pair, (iv, p), ph in zip(pairs, tested, adjusted, strict=True)]


def verdict(statuses: Sequence[str]) -> str:
    """A claim's verdict from its pairs' statuses."""
    if any(s == REVERSED for s in statuses):
        return CONTRADICTED
    held = sum(s == HOLDS for s in statuses)
    return REPRODUCED if statuses and held == len(statuses) else PARTLY if held else INCONCLUSIVE
