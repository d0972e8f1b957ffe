"""Verdicts from a few training seeds: mean and 95% Student-t interval, orderings decided beyond the intervals.

"reproduced" (True) when an ordering holds beyond the intervals, "not reproduced" (False) when the reverse does,
"inconclusive" (None) otherwise, and always with fewer than 2 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from geometry.offline.markdown import fmt


class Interval(NamedTuple):
    """Mean over seeds and its 95% Student-t interval (NaN bounds with one seed)."""

    mean: float
    lo: float
    hi: float
    n: int

    def show(self, kind: str = "g") -> str:
        if self.n < 2:
            return f"{fmt(self.mean, kind)} (1 seed)"
        return f"{fmt(self.mean, kind)} [{fmt(self.lo, kind)}, {fmt(self.hi, kind)}]"


def interval(values: Sequence[float]) -> Interval:
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if v.size == 1:
        return Interval(float(v[0]), math.nan, math.nan, 1)
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))


def below(a: Interval, b: Interval) -> bool | None:
    """a < b beyond the intervals: True; b < a beyond them: False; otherwise (or too few seeds) None."""
    if a.n < 2 or b.n < 2:
        return None
    return True if a.hi < b.lo else False if b.hi < a.lo else None


def all_of(tests: Sequence[bool | None]) -> bool | None:
    """Every part holds: True; some part is reversed: False; otherwise None."""
    return False if any(t is False for t in tests) else True if all(t is True for t in tests) else None


def threshold(x: Interval, t: float) -> bool | None:
    """x > t beyond its interval: True; x < t beyond it: False; otherwise None."""
    if x.n < 2:
        return None
    return True if x.lo > t else False if x.hi < t else None


def no_harm(drop: Interval) -> bool | None:
    """"Does not hurt": no drop beyond the seed spread (the interval reaches 0 or below): True; a drop beyond it:
    False; fewer than 2 seeds: None. Absence of harm cannot be shown more strongly than this."""
    t = threshold(drop, 0.0)
    return None if drop.n < 2 else t is not True


def flip(t: bool | None) -> bool | None:
    """The verdict of the opposite ordering."""
    return None if t is None else not t
