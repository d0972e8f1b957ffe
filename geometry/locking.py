"""Subspace-locking onset (SPEC item 7) from a trajectory of Sim_K to the final update."""

from __future__ import annotations

import math
from collections.abc import Sequence


def locking_onset(steps: Sequence[int], sims: Sequence[float], tau: float = 0.9) -> int | None:
    """Earliest measured step t such that Sim_K(t', T) >= tau for every measured t' >= t.

    The final step T itself is left out of the test: Sim_K(T, T) = 1 always, so counting it would make
    every run lock at T at the latest. A run whose last step before T is below tau (or that has no
    step before T) never locks: None, not a number. NaN similarities (a zero update) count as below tau.
    """
    if len(steps) != len(sims):
        raise ValueError("steps and sims must have the same length")
    order = sorted(range(len(steps)), key=lambda i: steps[i])
    steps = [steps[i] for i in order][:-1]  # drop the final step T
    sims = [sims[i] for i in order][:-1]
    onset = None
    for step, sim in zip(reversed(steps), reversed(sims), strict=True):
        if not (sim >= tau):  # also catches NaN
            break
        onset = step
    return onset


def median_onset(onsets: Sequence[int | None]) -> int | None:
    """Median onset over matrices, a matrix that never locks counting as +infinity.

    The lower median keeps the answer a measured step; when more than half never lock, so does the run.
    """
    if not onsets:
        return None
    keyed = sorted(math.inf if o is None else o for o in onsets)
    mid = keyed[(len(keyed) - 1) // 2]
    return None if mid == math.inf else int(mid)
