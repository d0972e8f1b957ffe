"""A short reading of each run in words, every phrase tied to a measured value and a stated threshold.

The thresholds are fixed here, before any result is looked at, and printed with each phrase so that a
reader can disagree with them. A phrase says where a figure stands against its threshold, never which
training regime a run resembles: no single figure supports such a label.
"""

from __future__ import annotations

import math

from geometry.offline.summary import RunSummary

SPARSE, DENSE = 0.5, 0.2  # bf16 sparsity at or above SPARSE: sparse; below DENSE: dense
SMALL_ANGLE, LARGE_ANGLE = 1.0, 10.0  # degrees: the paper's RLVR < 0.5, OPD ~1, SFT > 10
EARLY = 0.3  # a locking onset at or before this fraction of training is early


def reading(summaries: list[RunSummary], lock_k: int) -> list[str]:
    """The thresholds in one line, then one markdown bullet per run."""
    rules = (f"Thresholds: sparse when >= {SPARSE:.0%} of entries are unchanged at bf16, dense below {DENSE:.0%}, "
             "partly sparse between; off W0's principal "
             "directions when the two-sided overlap is below a random update's (ratio < 1); in low-magnitude "
             f"entries when the low-magnitude mask overlap exceeds chance (ratio > 1); barely rotates below "
             f"{SMALL_ANGLE:g} degree of max principal angle, rotates above {LARGE_ANGLE:g}; low update rank below "
             f"a mean stable rank of K = {lock_k}; locks early when the onset comes by {EARLY:.0%} of training.")
    return [rules, ""] + [f"- **{s.run}**: " + "; ".join(_phrases(s, lock_k)) + "." for s in summaries]


def _phrases(s: RunSummary, lock_k: int) -> list[str]:
    sp, ratio = s.final("sparsity_bf16"), s.final("overlap_2s_ratio")
    low, angle, rank = s.final("mask_overlap_lowmag_ratio"), s.final("angle_max_u"), s.final("stable_rank")
    out = []
    if math.isfinite(sp):
        kind = "sparse" if sp >= SPARSE else "dense" if sp < DENSE else "partly sparse"
        out.append(f"{kind} at bf16 ({100 * sp:.1f}% unchanged)")
    if math.isfinite(ratio):
        out.append(f"{'off' if ratio < 1 else 'toward'} W0's principal directions ({ratio:.2f}x random)")
    if math.isfinite(low):
        out.append(f"{'in' if low > 1 else 'not in'} low-magnitude entries beyond chance ({low:.2f}x)")
    if math.isfinite(angle):
        turn = "barely rotates" if angle < SMALL_ANGLE else "rotates" if angle > LARGE_ANGLE else "slightly rotates"
        out.append(f"{turn} the top-k directions (max angle {angle:.3g} deg)")
    if math.isfinite(rank):
        out.append(f"{'low' if rank < lock_k else 'high'} update rank (stable rank {rank:.3g})")
    if s.locking_onset_frac is None:
        out.append("does not lock (the median matrix never stays at Sim_K >= tau before the end)")
    else:
        out.append(f"locks {'early' if s.locking_onset_frac <= EARLY else 'late'} "
                   f"(onset at {s.locking_onset_frac:.0%} of training)")
    return out
