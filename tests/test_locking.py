"""Locking onset (SPEC item 7) on planted Sim_K trajectories: the earliest measured step from which every
later measured step (the final one left out) stays at or above tau; "none" when there is none."""

import math

import numpy as np
import pytest
import torch

from geometry.locking import locking_onset, median_onset, step_sims

STEPS = [10, 20, 30, 40, 50]


def test_never_locks_is_none():
    assert locking_onset(STEPS, [0.2, 0.3, 0.5, 0.6, 1.0]) is None


def test_last_step_before_final_below_tau_is_none():
    assert locking_onset(STEPS, [0.95, 0.95, 0.95, 0.85, 1.0]) is None


def test_locks_at_planted_step():
    assert locking_onset(STEPS, [0.3, 0.5, 0.92, 0.97, 1.0]) == 30


def test_locked_from_first_step():
    assert locking_onset(STEPS, [0.91, 0.95, 0.97, 0.99, 1.0]) == 10


def test_value_equal_to_tau_counts_as_locked():
    assert locking_onset(STEPS, [0.1, 0.9, 0.9, 0.9, 1.0], tau=0.9) == 20


def test_dip_after_locking_resets_onset():
    assert locking_onset(STEPS, [0.95, 0.96, 0.4, 0.97, 1.0]) == 40


def test_nan_counts_as_below_tau():
    assert locking_onset(STEPS, [0.95, math.nan, 0.96, 0.97, 1.0]) == 30
    assert locking_onset(STEPS, [0.95, 0.96, 0.97, math.nan, 1.0]) is None


def test_final_step_alone_never_locks():
    # Sim_K(T, T) = 1 always, so the final step is no evidence; one checkpoint gives no onset
    assert locking_onset([100], [1.0]) is None
    assert locking_onset([10, 100], [0.2, 1.0]) is None


def test_unsorted_steps_are_ordered_first():
    assert locking_onset([40, 10, 50, 30, 20], [0.97, 0.3, 1.0, 0.92, 0.5]) == 30


def test_tau_changes_the_onset():
    sims = [0.6, 0.75, 0.85, 0.95, 1.0]
    assert locking_onset(STEPS, sims, tau=0.9) == 40
    assert locking_onset(STEPS, sims, tau=0.7) == 20
    assert locking_onset(STEPS, sims, tau=0.5) == 10


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        locking_onset(STEPS, [0.9, 1.0])


def test_median_onset_of_numbers_is_lower_median():
    assert median_onset([30, 10, 20]) == 20
    assert median_onset([10, 40]) == 10  # a measured step, not 25


def test_median_onset_counts_none_as_never():
    assert median_onset([None, 10, 20]) == 20
    assert median_onset([None, None, 10]) is None  # more than half never lock: the run never locks
    assert median_onset([None, 10]) == 10
    assert median_onset([None]) is None


def test_median_onset_of_nothing_is_none():
    assert median_onset([]) is None


# ---- Sim_K of each step to the final and the previous one ----

def _basis(g, n, k):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def test_step_sims_against_principal_angles():
    """Batched Sim_K equals the mean squared cosine of the principal angles (scipy-free reference: the singular
    values of A^T B, one matrix at a time, in numpy), where both updates moved; NaN where either is zero."""
    g = torch.Generator().manual_seed(0)
    cur, fin, prev = (torch.stack([_basis(g, 20, 4) for _ in range(6)]).reshape(2, 3, 20, 4) for _ in range(3))
    moved = torch.tensor([[True, True, False], [True, True, True]])
    fin_moved = torch.tensor([[True, False, True], [True, True, True]])
    prev_moved = torch.tensor([[True, True, True], [False, True, True]])
    sims = step_sims(cur, fin, prev, moved, fin_moved, prev_moved)
    assert sims.final.shape == sims.prev.shape == (2, 3) and sims.final.dtype == torch.float64

    def ref(a, b):
        cos = np.linalg.svd(a.numpy().T @ b.numpy(), compute_uv=False)
        return float(np.mean(cos**2))

    for i in range(2):
        for j in range(3):
            for got, other, ok in ((sims.final, fin, moved & fin_moved), (sims.prev, prev, moved & prev_moved)):
                if ok[i, j]:
                    assert got[i, j].item() == pytest.approx(ref(cur[i, j], other[i, j]), abs=1e-12)
                else:
                    assert math.isnan(got[i, j].item())


def test_step_sims_identities():
    g = torch.Generator().manual_seed(1)
    a = _basis(g, 30, 5)
    yes = torch.tensor(True)
    same = step_sims(a, a, None, yes, yes)
    assert same.final.item() == pytest.approx(1.0, abs=1e-12) and math.isnan(same.prev.item())  # no previous
    rotated = a @ _basis(g, 5, 5)  # another basis of the same subspace
    assert step_sims(a, rotated, rotated, yes, yes, yes).prev.item() == pytest.approx(1.0, abs=1e-12)
    e = torch.eye(30, dtype=torch.float64)
    assert step_sims(e[:, :5], e[:, 5:10], None, yes, yes).final.item() == 0.0  # orthogonal subspaces
