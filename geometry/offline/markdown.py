"""``summary.md``: the run-level summary as the paper lays out its tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

from geometry.offline.reading import reading
from geometry.offline.summary import RunSummary


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v: float | None, kind: str = "g") -> str:
    """Numbers for people: percentages, degrees, small floats in scientific notation; NaN/None as 'n/a'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if kind == "%":
        return f"{100 * v:.2f}"
    if kind == "deg":
        return f"{v:.3g}"
    if kind == "e":
        return f"{v:.2e}"
    if kind == "int":
        return f"{v:.0f}"
    return f"{v:.4g}"


def render_summary(summaries: list[RunSummary], notes: list[str], tau: float, alpha: float = 0.3,
                   lock_k: int = 16) -> str:
    """The whole summary.md: sparsity (the paper's Table 1), localisation, angles and spectrum, overlap,
    rank, locking. Values are at each run's final step, aggregated over matrices (summary.py says how)."""
    S = summaries
    parts = ["# Update geometry summary", "",
             "## Reading", "", *reading(S, lock_k), "",
             "Values at each run's final checkpoint, aggregated over matrices: sparsity weighted by parameter "
             "count, mask overlaps pooled over changed entries, everything else an unweighted mean.", "",
             table(["run", "steps measured", "final step", "matrices"],
                   [[s.run, len(s.steps), s.steps[-1], s.matrices] for s in S]), "",
             "## Update sparsity (Table 1 layout)", "",
             table(["run", "bf16 sparsity (%)", "sparsity, |D| <= 1e-5 (%)", "density (%)"],
                   [[s.run, fmt(s.final("sparsity_bf16"), "%"), fmt(s.final("sparsity_abs"), "%"),
                     fmt(1 - s.final("sparsity_bf16"), "%")] for s in S]), "",
             "## Localisation of the update mask", "",
             f"Share of changed entries inside the principal mask (top {alpha:.0%} of |rank-r reconstruction of W0|, "
             f"r in the notes) and the low-magnitude mask (bottom {alpha:.0%} of |W0|); a random mask gives "
             f"{alpha:.0%}.", "",
             table(["run", "update density (%)", "principal-mask overlap (%)", "low-magnitude-mask overlap (%)"],
                   [[s.run, fmt(1 - s.final("sparsity_bf16"), "%"), fmt(s.final("mask_overlap_principal"), "%"),
                     fmt(s.final("mask_overlap_lowmag"), "%")] for s in S]), "",
             "## Principal angles, spectral shift, intruders", "",
             table(["run", "max angle U (deg)", "mean angle U (deg)", "max angle V (deg)", "mean angle V (deg)",
                    "NSS", "intruders (of top 10)"],
                   [[s.run, fmt(s.final("angle_max_u"), "deg"), fmt(s.final("angle_mean_u"), "deg"),
                     fmt(s.final("angle_max_v"), "deg"), fmt(s.final("angle_mean_v"), "deg"),
                     fmt(s.final("nss"), "e"), fmt(s.final("intruders"))] for s in S]), "",
             "## Overlap of the update with W0's principal subspace", "",
             table(["run", "two-sided", "/ random baseline", "left", "right"],
                   [[s.run, fmt(s.final("overlap_2s"), "e"), fmt(s.final("overlap_2s_ratio")),
                     fmt(s.final("overlap_left")), fmt(s.final("overlap_right"))] for s in S]), "",
             "## Rank of the cumulative update", "",
             table(["run", "stable rank", "effective rank", "r90", "r99", "||D||_F", "Hill alpha"],
                   [[s.run] + [fmt(s.final(m)) for m in ("stable_rank", "effective_rank", "r90", "r99",
                                                         "fro_norm", "hill_alpha")] for s in S]), "",
             _locking(S, tau)]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def _locking(S: list[RunSummary], tau: float) -> str:
    def none(v, spec: str = "") -> str:
        return "none" if v is None else format(v, spec)

    onset = table(["run", "onset, all matrices (step)", "fraction of training", "matrices locked",
                   "onset, attention q/k/v/o (step)", "fraction", "attention matrices locked"],
                  [[s.run, none(s.locking_onset_step), none(s.locking_onset_frac, ".2f"),
                    f"{sum(o is not None for o in s.onsets.values())}/{len(s.onsets)}",
                    none(s.attention_onset_step), none(s.attention_onset_frac, ".2f"),
                    f"{sum(s.onsets[x] is not None for x in s.attention)}/{len(s.attention)}"] for s in S])
    steps = sorted({st for s in S for st in s.steps})
    traj_rows = []
    for st in steps:
        row = [st]
        for s in S:
            row.append(fmt(s.per_step["sim_final_v"][s.steps.index(st)]) if st in s.steps else "")
        traj_rows.append(row)
    traj = table(["step"] + [f"{s.run}: Sim_K to final (V)" for s in S], traj_rows)
    return "\n".join([
        "## Subspace locking", "",
        f"Onset: the earliest measured step from which Sim_K (right singular subspace of D_t vs the final D_T) "
        f"stays >= {tau} at every later measured step before the last; median over matrices (all of them, and "
        "the attention matrices alone, the paper's view); 'none' when the median matrix never locks. The "
        "trajectory below is the mean over all matrices.", "", onset, "", traj])
