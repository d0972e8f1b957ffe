"""``summary.md``: the run-level summary as the paper lays out its tables; ``to_html`` renders it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markdown_it import MarkdownIt

from geometry.offline.reading import reading
from geometry.offline.summary import RunSummary


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")  # a bare '|' in "|D| <= 1e-5" or "||D||_F" would start a new column


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, '|' in a cell escaped. Every table of summary.md and the demo's
    report is written here."""
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_html(md: str) -> str:
    """Markdown as an HTML fragment: CommonMark with GitHub's tables (markdown-it-py). Raw HTML in the text is
    escaped, not passed through: run labels and matrix names come from the user's files."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(md)


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
    if kind == "pts":  # percentage points, already scaled
        return f"{v:.1f}"
    return f"{v:.4g}"


# The paper's tables as column specs (header, metric, fmt kind), shared by summary.md and the demo's report
# (geometry.lab.report), which fills the same columns with means and intervals over seeds. "density" is
# 1 - sparsity_bf16.
Column = tuple[str, str, str]
SPARSITY: list[Column] = [("bf16 sparsity (%)", "sparsity_bf16", "%"),
                          ("sparsity, |D| <= 1e-5 (%)", "sparsity_abs", "%"), ("density (%)", "density", "%")]
LOCALISATION: list[Column] = [("update density (%)", "density", "%"),
                              ("principal-mask overlap (%)", "mask_overlap_principal", "%"),
                              ("low-magnitude-mask overlap (%)", "mask_overlap_lowmag", "%")]
ANGLES: list[Column] = [("max angle U (deg)", "angle_max_u", "deg"), ("mean angle U (deg)", "angle_mean_u", "deg"),
                        ("max angle V (deg)", "angle_max_v", "deg"), ("mean angle V (deg)", "angle_mean_v", "deg"),
                        ("NSS", "nss", "e"), ("intruders (of top 10)", "intruders", "g")]


def final_value(s: RunSummary, metric: str) -> float:
    """A run's value at its final step; "density" is 1 - bf16 sparsity."""
    return 1.0 - s.final("sparsity_bf16") if metric == "density" else s.final(metric)


def metric_table(columns: Sequence[Column], rows: Sequence[tuple[str, Callable[[str, str], str]]],
                 extra: Sequence[str] = (), extra_cells: Callable[[str], Sequence[str]] | None = None) -> str:
    """One row per (run, cell) pair: cell(metric, kind) renders each column; ``extra`` columns after them."""
    return table(["run", *(c[0] for c in columns), *extra],
                 [[run, *(cell(m, k) for _, m, k in columns), *(extra_cells(run) if extra_cells else ())]
                  for run, cell in rows])


def _finals(S: Sequence[RunSummary]) -> list[tuple[str, Callable[[str, str], str]]]:
    return [(s.run, lambda m, k, s=s: fmt(final_value(s, m), k)) for s in S]


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
             metric_table(SPARSITY, _finals(S)), ""]
    if _measured(S, "mask_overlap_principal"):  # the quick suite (--quick) measures the update alone
        parts += ["## Localisation of the update mask", "",
                  f"Share of changed entries inside the principal mask (top {alpha:.0%} of |rank-r reconstruction "
                  f"of W0|, r in the notes) and the low-magnitude mask (bottom {alpha:.0%} of |W0|); a random mask "
                  f"gives {alpha:.0%}.", "",
                  metric_table(LOCALISATION, _finals(S)), ""]
    if _measured(S, "angle_max_u"):
        parts += ["## Principal angles, spectral shift, intruders", "",
                  metric_table(ANGLES, _finals(S)), ""]
    if _measured(S, "overlap_2s"):
        parts += ["## Overlap of the update with W0's principal subspace", "",
                  table(["run", "two-sided", "/ random baseline", "left", "right"],
                        [[s.run, fmt(s.final("overlap_2s"), "e"), fmt(s.final("overlap_2s_ratio")),
                          fmt(s.final("overlap_left")), fmt(s.final("overlap_right"))] for s in S]), ""]
    parts += ["## Rank of the cumulative update", "",
              table(["run", "stable rank", "effective rank", "r90", "r99", "||D||_F", "||D||_F / ||W0||_F",
                     "Hill alpha"],
                    [[s.run] + [fmt(s.final(m)) for m in ("stable_rank", "effective_rank", "r90", "r99",
                                                          "fro_norm", "rel_norm", "hill_alpha")] for s in S]), "",
              _locking(S, tau)]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def _measured(S: Sequence[RunSummary], metric: str) -> bool:
    return any(metric in s.per_step for s in S)


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
