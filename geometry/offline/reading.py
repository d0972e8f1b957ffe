"""A short reading of each run in words, every phrase tied to a measured value and a stated threshold.

The thresholds are fixed here, before any result is looked at, and printed with each phrase so that a
reader can disagree with them. Where a phrase compares with the paper (Shen et al. 2026), it compares
with the paper's own figures: bf16 sparsity SFT 8.1%, OPD 51.6%, RLVR 77.2%.
"""

from __future__ import annotations

import math

from geometry.offline.summary import RunSummary

SPARSE, DENSE = 0.5, 0.2  # bf16 sparsity at or above SPARSE: sparse; below DENSE: dense
# the paper's regimes by bf16 sparsity, split at the midpoints of its figures (8.1 / 51.6 / 77.2 %)
PAPER_SPLITS = ((0.2985, "SFT"), (0.644, "OPD"), (math.inf, "RLVR"))
SMALL_ANGLE, LARGE_ANGLE = 1.0, 10.0  # degrees: the paper's RLVR < 0.5, OPD ~1, SFT > 10
EARLY = 0.3  # a locking onset at or before this fraction of training is early


def reading(summaries: list[RunSummary], lock_k: int) -> list[str]:
    """One markdown bullet per run."""
    return [f"- **{s.run}**: " + "; ".join(p for p in _phrases(s, lock_k) if p) + "." for s in summaries]


def _phrases(s: RunSummary, lock_k: int) -> list[str]:
    sp, ratio = s.final("sparsity_bf16"), s.final("overlap_2s_ratio")
    low, angle, rank = s.final("mask_overlap_lowmag_ratio"), s.final("angle_max_u"), s.final("stable_rank")
    out = []
    if math.isfinite(sp):
        kind = "sparse" if sp >= SPARSE else "dense" if sp < DENSE else "partly sparse"
        like = next(name for split, name in PAPER_SPLITS if sp < split)
        out.append(f"{kind} at bf16 ({100 * sp:.1f}% of entries unchanged; sparse >= {100 * SPARSE:.0f}%, "
                   f"dense < {100 * DENSE:.0f}%), closest to the paper's {like} by this measure")
    if math.isfinite(ratio):
        where = "off" if ratio < 1 else "toward"
        out.append(f"{where} W0's principal directions relative to a random update (two-sided overlap "
                   f"{ratio:.2f}x random; < 1 is off)")
    if math.isfinite(low):
        out.append(f"changed entries {'in' if low > 1 else 'not in'} the low-magnitude weights beyond chance "
                   f"({low:.2f}x random; > 1 is beyond)")
    if math.isfinite(angle):
        turn = "barely rotates" if angle < SMALL_ANGLE else "rotates" if angle > LARGE_ANGLE else "slightly rotates"
        out.append(f"{turn} the top-k singular directions (max angle {angle:.3g} deg; < {SMALL_ANGLE:g} barely, "
                   f"> {LARGE_ANGLE:g} rotates)")
    if math.isfinite(rank):
        out.append(f"{'low' if rank < lock_k else 'high'} update rank (mean stable rank {rank:.3g}; "
                   f"low below K = {lock_k})")
    if s.locking_onset_frac is None:
        out.append("does not lock (the median matrix never stays at Sim_K >= tau before the end)")
    else:
        when = "early" if s.locking_onset_frac <= EARLY else "late"
        out.append(f"locks {when} (onset at {s.locking_onset_frac:.0%} of training; early <= {EARLY:.0%})")
    return out
