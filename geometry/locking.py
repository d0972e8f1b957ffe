"""Subspace locking (SPEC item 7): Sim_K of each step's update subspace to the final and the previous
step's, and the locking onset read from that trajectory. Used by the offline engine (exact SVDs of
checkpoints) and by the capture's per-step tracking alike."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from geometry.subspaces import subspace_sim


class StepSims(NamedTuple):
    """Sim_K of one step's top-K subspace, float64 (...,): NaN where either update is zero."""

    final: torch.Tensor  # to the final measured step T (1 at T itself)
    prev: torch.Tensor  # to the previous measured step; NaN at the first


def step_sims(cur: torch.Tensor, final: torch.Tensor, prev: torch.Tensor | None, moved: torch.Tensor,
              final_moved: torch.Tensor, prev_moved: torch.Tensor | None = None) -> StepSims:
    """Sim_K(cur, final) and Sim_K(cur, prev) for orthonormal bases (..., n, K), batched over leading dims.

    moved, final_moved, prev_moved: (...,) bool, where D_t, D_T and the previous D_s are nonzero. A zero
    update has no subspace (its "basis" is whatever the decomposition returned), so a pair with one is NaN.
    prev None: the first measured step, which has no previous one.
    """
    nan = torch.full(moved.shape, math.nan, dtype=torch.float64, device=moved.device)
    to_final = torch.where(moved & final_moved, subspace_sim(cur, final), nan)
    to_prev = nan if prev is None else torch.where(moved & prev_moved, subspace_sim(cur, prev), nan)
    return StepSims(to_final, to_prev)


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
