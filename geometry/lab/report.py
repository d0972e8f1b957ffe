"""The demo's report: every claim of the paper with its pairs decided over training seeds
(geometry.lab.claims, geometry.lab.stats), the setup beside the paper's, and the figures.

A run's value is the run-level aggregate of geometry.offline.summary (SPEC's aggregation) at one seed; tables
show the mean over seeds and its 95% Student-t interval. Trajectories (Sim_K, stable rank) use the attention
matrices q/k/v/o, the paper's selection, with the all-matrix view beside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from geometry.lab.claims import (
    EARLY,
    PROJECTION_MARGIN,
    Claim,
    Views,
    accuracy,
    at,
    claims,
    gain_share,
    per_seed,
    sim_early,
    tracked_curve,
    tracked_onsets,
    trajectory_values,
    views,
)
from geometry.lab.figures import figures
from geometry.lab.paper import PAPER_ANGLES, PAPER_LOCALISATION, PAPER_NSS, PAPER_SIM20, PAPER_SPARSITY
from geometry.lab.precision import PAPER_LR, PAPER_WEIGHT_STD, SFT_LR_RATIO, paper_spacing
from geometry.lab.pretrain import BASE_STEP, PRETRAIN_STEPS
from geometry.lab.setting import (
    measured_params,
    noise_words,
    points,
    setup_rows,
    structure_lines,
    teaching_lines,
    trainer_name,
)
from geometry.lab.sharing import sharing_lines
from geometry.lab.stats import ALPHA, VERDICTS, Interval, interval
from geometry.lab.study import CONTROLS, MAIN, PROJECTED, StudyResult, label, save_study
from geometry.offline.markdown import ANGLES, LOCALISATION, SPARSITY, final_value, fmt, metric_table, table
from geometry.offline.summary import RunSummary


def _iv(values: dict[int, float]) -> Interval:
    return interval(list(values.values()))


# ---- claims ----


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def claim_lines(claims_: list[Claim]) -> list[str]:
    """The rule, the tally, one bullet a claim, and the table of every pair."""
    counts = ", ".join(f"{sum(c.verdict == v for c in claims_)} {v}" for v in VERDICTS)
    lines = [
        "How the study decides (fixed before any verdict; geometry/lab/stats.py): a claim is a set of orderings "
        "(pairs), each stated in the paper's direction. A pair is decided by a two-sided paired t-test over seeds "
        "(runs of one seed share data order and prompts; against a threshold or margin, a one-sample test), with "
        f"Holm's correction over the claim's pairs (family-wise {ALPHA:.0%}): **holds** when significant in the "
        "paper's direction, **reversed** when significant against it, **undecided** otherwise. A claim is "
        "**reproduced** when all its pairs hold, **contradicted** when any is reversed, **partly** when some hold "
        "and the rest are undecided, **inconclusive** when none is decided. Values: mean over seeds [95% "
        "t-interval].", "",
        f"{counts} of {len(claims_)} claims.", ""]
    lines += [f"- **{c.verdict}** (claim {i}): {c.text}. " + ", ".join(f"{p.text}: {p.status}" for p in c.pairs)
              + f". {c.evidence}." for i, c in enumerate(claims_, 1)]
    rows = [[i, p.text, fmt(p.diff.mean, c.kind),
             f"[{fmt(p.diff.lo, c.kind)}, {fmt(p.diff.hi, c.kind)}]" if p.diff.n >= 2 else "n/a", p.diff.n,
             _p(p.p), _p(p.p_holm), p.status] for i, c in enumerate(claims_, 1) for p in c.pairs]
    lines += ["", "Every pair. *difference*: the mean over seeds of the per-seed difference in the paper's "
              "direction (for A < B it is B - A, for A > B it is A - B; against a threshold or margin, the value's "
              "distance from it on the side the claim states), so a positive difference agrees with the paper; "
              "in the claim's units (percentage points for %). *95% interval*: Student-t over the seeds' "
              "differences. *seeds*: seeds paired. *p*: two-sided paired t-test. *p, Holm*: adjusted over the "
              f"claim's pairs; a pair is decided when it is <= {ALPHA:g}.", "",
              table(["claim", "pair", "difference", "95% interval", "seeds", "p", "p, Holm", "status"], rows)]
    return lines


# ---- the student's structure ----


def seed_cells(study: StudyResult, S: dict[str, RunSummary]) -> list[tuple[str, Callable[[str, str], str]]]:
    """markdown.metric_table rows: each run's final value as mean [95% interval] over its seeds."""
    def cell(name: str) -> Callable[[str, str], str]:
        return lambda m, kind: _iv(per_seed(study, S, name, lambda s: final_value(s, m))).show(kind)
    return [(name, cell(name)) for name in study.runs]


def render(study: StudyResult, claims_: list[Claim], V: Views, figures: list[str]) -> str:
    cfg, bd, lrs = study.config, study.boundaries, study.lrs
    tau, K = study.analysis.config.tau, cfg.lock_k
    n_seeds = max(len(v) for v in study.runs.values())
    if study.reference:
        steps = {n: study.runs[n][0].steps for n in MAIN}
        title, what = ("# geometry reference study: SFT, then RLVR and OPD from it, at the paper's proportions",
                f"A tiny Llama student ({measured_params(study):,} parameters in its measured matrices): SFT on long "
                f"operands (a shifted task) from a less-trained base (its pretraining checkpoint at step {BASE_STEP} "
                f"of {PRETRAIN_STEPS}) for {steps['sft']} steps with cosine decay, then OPD for {steps['opd']} and "
                f"RLVR for {steps['rlvr']} steps from each seed's SFT checkpoint (the paper's counts)")
    else:
        title, what = ("# geometry demo: SFT vs RLVR vs OPD on a tiny LM",
                f"A tiny Llama student ({measured_params(study):,} parameters in its measured matrices), pretrained "
                f"to convergence on short-operand addition and subtraction, post-trained on long operands (a shifted "
                f"task) by each regime from the same bf16 checkpoint for {cfg.steps} steps")
    lines = [
        title, "", what + f", {n_seeds} training seeds per run, recorded by our callback and analysed as bf16 "
        f"checkpoints. Learning rates: SFT {lrs['sft']:.3g}, RLVR and OPD {lrs['opd']:.3g} (the paper's precision "
        f"regime, below). K = {K}. Total time {study.seconds / 60:.1f} min. The paper (Shen et al. 2026) trains an "
        "8B student; absolute values are not expected to match, orderings are what we test.", "",
        *structure_lines(study),
        "## Claims at this scale", "", *claim_lines(claims_),
    ]
    if not all(c in study.runs for c in CONTROLS):
        lines += ["", "Not run in this study, so not decided: the paper's controls (off-policy OPD, and OPD's "
                  "advantage mixed with GRPO's); `geometry demo` runs them."]
    lines += ["", "## Setup: differences from the paper", "",
              table(["", "paper", "here", "why"], setup_rows(study))]
    lines += ["", "## Learning rates: the precision regime", "",
              "Rule (fixed before any verdict was seen; geometry/lab/precision.py): OPD and RLVR get "
              f"lr = {PAPER_LR:g} x G(student) / G(8B), SFT 10x that, G the geometric mean of the bf16 spacing of "
              "the measured matrices' entries. Adam moves an entry by about lr per step, so this keeps the paper's "
              "ratio of step to bf16 resolution. The 8B side is estimated as entries ~ N(0, "
              f"{PAPER_WEIGHT_STD}^2) (the initializer range of 4096-wide Llama/Qwen models, about the spread of "
              f"trained 7-8B projections): G(8B) = {paper_spacing():.3g}; with std 0.015 or 0.03 it would be "
              f"{paper_spacing(0.015):.3g} or {paper_spacing(0.03):.3g}, moving the lr by the inverse ratio. "
              + (f"G of each run's starting model: the base's "
                 f"{lrs['sft'] / SFT_LR_RATIO / PAPER_LR * paper_spacing():.3g} "
                 f"(SFT), seed 0's SFT checkpoint's {lrs['opd'] / PAPER_LR * paper_spacing():.3g} (OPD and RLVR; "
                 "each seed's from its own checkpoint)." if study.reference else
                 f"G(student) = {lrs['opd'] / PAPER_LR * paper_spacing():.3g}."), ""]
    lines += ["## Runs", "", table(
        ["run", "trainer", "seeds", "steps", "lr", "accuracy before (%)", "accuracy after (%)",
         "steps skipped, sum over seeds", "time (s), sum over seeds"],
        [[n, trainer_name(n), len(rs), rs[0].steps, f"{rs[0].lr:.3g}", interval([r.acc_before for r in rs]).show("%"),
          interval([r.acc_after for r in rs]).show("%"), sum(r.skipped for r in rs),
          f"{sum(r.seconds for r in rs):.0f}"] for n, rs in study.runs.items()]),
        "", f"Accuracy: greedy exact answer on {cfg.eval_problems} held-out problems of the post-training task, the "
        f"same problems for every run and seed. {noise_words(study)} *before*: the accuracy of the model the run "
        "starts from (bf16), *after*: the trained model's (float32), each the mean over seeds [95% t-interval]; "
        "*lr*: seed 0's. *steps skipped*: steps whose every prompt group "
        "had one reward (nothing to learn from). In every table below a cell is the mean over seeds [95% "
        "t-interval] of the run's final value, unless its column says otherwise; density = 1 - bf16 sparsity.",
        "", *teaching_lines(study, V.all)]
    cells = seed_cells(study, V.all)
    lines += ["", "## Update sparsity (Table 1)", "",
              metric_table(SPARSITY, cells, ["paper bf16 sparsity (%)"],
                           lambda r: [fmt(PAPER_SPARSITY[r], "%") if r in PAPER_SPARSITY else ""])]
    alpha = study.analysis.config.alpha
    lines += ["", "## Localisation of the update mask", "",
              f"Random baseline of either overlap: {100 * alpha:.0f}% (alpha). Paper: density / principal / "
              "low-magnitude.", "",
              metric_table(LOCALISATION, cells, ["paper"],
                           lambda r: [" / ".join(fmt(x, "%") for x in PAPER_LOCALISATION[r])
                                      if r in PAPER_LOCALISATION else ""]),
              "", "*principal-mask overlap*: share of the changed entries inside the top-alpha entries of |rank-r "
              "reconstruction of W0|; *low-magnitude-mask overlap*: inside the bottom-alpha entries of |W0| "
              "(SPEC 5), pooled over matrices."]
    pairs = getattr(study.analysis, "pairs", None)
    if pairs is not None and (section := sharing_lines(pairs, [n for n in MAIN if n in study.runs])):
        lines += ["", *section]  # do seeds of one regime share more changed entries than two regimes do?
    lines += ["", "## Principal angles and spectral shift", "",
              metric_table(ANGLES, cells, ["paper angle, NSS"],
                           lambda r: [f"{PAPER_ANGLES[r]} deg, {PAPER_NSS[r]}" if r in PAPER_ANGLES else ""]),
              "", "*angles*: between the top-k singular subspaces of W0 and W_T (SPEC 2), max and mean over the k "
              "angles, then the mean over matrices; *NSS*: ||s(W_T) - s(W0)|| / ||s(W0)|| (SPEC 3); *intruders*: "
              "top-10 singular vectors of W_T with no singular vector of W0 at |cos| >= 0.5 (SPEC 8)."]
    lines += ["", "## Subspace locking", "",
              f"Read from the per-step tracking of the trained float32 weights (what training did; docs/metrics.md "
              f"item 7), attention matrices q/k/v/o (the paper's view): Sim_K (K = {K}, right singular subspace) of "
              "D_t to the final update at the step nearest 20%, the stable rank of D_t, and the locking onset "
              "located per step. The bf16 checkpoints' values stand beside them, flagged where most entries of the "
              "update are unchanged at that checkpoint: there bf16 rounding, not training, shapes the update's "
              "spectrum.", "",
              table(["run", "Sim_K at 20%, float32", "bf16 checkpoint", "bf16 sparsity at 20%", "paper",
                     "stable rank final, float32", "final / 20%", "band from 20%", "onset (frac) per seed, float32",
                     "onset, bf16, seed 0"],
                    _locking_rows(study, V)),
              "", "*Sim_K at 20%*: mean over the attention matrices at the tracked step nearest 20%, mean [95% "
              "interval] over seeds; *bf16 checkpoint*: the same at the bf16 checkpoint nearest 20%, marked "
              "*(rounding)* where over half of the update's entries are unchanged there; *bf16 sparsity at 20%*: "
              "that share (%); *paper*: its Figure's reading; *stable rank final*: ||D_T||_F^2 / s1(D_T)^2, mean "
              "over matrices; *final / 20%*: its ratio to the value at 20%; *band from 20%*: (max - min) / mean of "
              f"the stable rank over the tracked steps from 20%; *onset*: earliest step from which Sim_K stays >= "
              f"{tau} (median over matrices; 'none' if never), step (fraction of training), one per seed."]
    lines += ["", "## Are there boundaries at k and K?", "",
              f"A K-dimensional subspace is only well defined when the spectrum has a gap at K. OPD's final "
              f"update on the float32 weights (per-step tracking, attention matrices): stable rank "
              f"{bd.opd_stable_rank:.2f}, so K = {K}; s_K / s_K+1 = {bd.update_gap:.3g} (median over matrices and "
              f"seeds). The same update read from the bf16 checkpoints has stable rank "
              f"{bd.opd_stable_rank_bf16:.2f}: bf16 rounding moves entries by whole bf16 spacings or not at all, "
              "spread-out quantisation noise that raises the stable rank. The student's W0 at the "
              f"analyzer's k = {bd.principal_k}: s_k / s_k+1 = {bd.base_gap:.3g}. "
              + _gap_words(bd.update_gap, bd.base_gap)]
    lines += ["", "## Gradient projection (the causal test)", "",
              "From 20% of training every gradient G of a measured matrix is replaced by G V_K V_K^T, V_K the "
              f"top-{K} right singular vectors of D_t at that step. Paper: no loss for OPD, a loss for SFT.", "",
              table(["regime", "unconstrained accuracy (%)", "projected accuracy (%)", "gain (points)",
                     "drop (points)", "share of gain lost (%)"], _projection_rows(study)),
              "", "*gain*: unconstrained accuracy minus the student's; *drop*: unconstrained minus projected, "
              "paired by seed; *share of gain lost*: drop / gain by seed (a seed that gained nothing has none). "
              f"The projection claim reads *hurts* where the share lies above {100 * PROJECTION_MARGIN:g}% "
              "of the gain (a margin fixed before the run; geometry/lab/claims.py says why), *does not hurt* where "
              "it lies below, each decided by a t-test against the margin with Holm's correction over the "
              "claim's two parts."]
    lines += ["", "## Figures", ""] + [f"![{f}](figures/{f})" for f in figures]
    if study.analysis.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in collapse_notes(study.analysis.notes, study_labels(study))]
    lines += ["", "Per-seed tables of every metric: `analysis/summary.md` (runs labelled name/sSEED); per matrix: "
              "`analysis/metrics.csv` (bf16 checkpoints), `analysis/tracking.csv` (per step, float32 weights)."]
    return "\n".join(lines) + "\n"


def _projection_rows(study: StudyResult) -> list[list[str]]:
    rows = []
    for proj, free in PROJECTED.items():
        if free not in study.runs or proj not in study.runs:
            continue
        acc, start = accuracy(study, free), {r.seed: r.acc_before for r in study.runs[free]}
        pacc = accuracy(study, proj)
        rows.append([free, _iv(acc).show("%"), _iv(pacc).show("%"),
                     points(_iv({s: acc[s] - start[s] for s in acc})),
                     points(_iv({s: acc[s] - pacc[s] for s in acc if s in pacc})),
                     gain_share(study, free, proj).show("%")])
    return rows


def study_labels(study: StudyResult) -> list[str]:
    return [label(n, r.seed) for n, rs in study.runs.items() for r in rs]


def collapse_notes(notes: list[str], labels: list[str]) -> list[str]:
    """One line per distinct note: notes that differ only in the run labels before their first ': ' merged,
    the labels listed once ("all runs" when every run of the study has it). A note on "these runs" (a group
    sharing something) is kept whole: merging groups would read as one group."""
    known, merged = set(labels), {}
    for note in notes:
        who, sep, text = note.partition(": ")
        runs = who.split(", ")
        if not sep or not set(runs) <= known or "these runs" in text:  # a note on a group stays with its group
            merged.setdefault(note, [])
            continue
        merged.setdefault(text, []).extend(r for r in runs if r not in merged.get(text, []))
    out = []
    for text, runs in merged.items():
        if not runs:
            out.append(text)
        else:
            who = "all runs" if set(runs) == known else ", ".join(sorted(runs, key=labels.index))
            out.append(f"{who}: {text}")
    return out


def _gap_words(update_gap: float, base_gap: float) -> str:
    flat = [w for w, g in (("OPD's update at K", update_gap), ("W0 at k", base_gap)) if g < 1.1]
    if not flat:
        return "Both exceed 1.1: the boundaries separate distinguishable directions."
    return (f"{' and '.join(flat)} {'is' if len(flat) == 1 else 'are'} within 10% of flat (gap < 1.1): there the "
            "subspace boundary is weakly defined and Sim_K near the boundary mixes neighbouring directions.")


def _locking_rows(study: StudyResult, V: Views) -> list[list[str]]:
    tau = study.analysis.config.tau
    traj = trajectory_values(study, V, tuple(study.runs))
    rows = []
    for name, results in study.runs.items():
        def iv(S, f, name=name):
            return _iv(per_seed(study, S, name, f))
        bf16_sparsity = iv(V.all, lambda s: at(s, "sparsity_bf16", EARLY))
        flag = " (rounding)" if bf16_sparsity.mean > 0.5 else ""
        final = {r.seed: c[-1][1] for r in results if (c := tracked_curve(study, name, r.seed, "track_stable_rank"))}
        onsets = []
        for r in results:
            step = tracked_onsets(study, name, r.seed, tau)
            onsets.append("none" if step is None else f"{step} ({step / r.steps:.2f})")
        s0 = V.attn.get(label(name, 0))
        rows.append([name, _iv(traj.sim_early[name]).show(), iv(V.attn, sim_early).show() + flag,
                     bf16_sparsity.show("%"), PAPER_SIM20.get(name, ""), _iv(final).show(),
                     _iv(traj.growth[name]).show(), _iv(traj.band[name]).show(), ", ".join(onsets),
                     _onset(s0.attention_onset_step if s0 else None, s0)])
    return rows


def _onset(step: int | None, s: RunSummary | None) -> str:
    return "none" if step is None or s is None else f"{step} ({step / s.steps[-1]:.2f})"


def write_report(study: StudyResult, *, rerender: bool = False) -> Path:
    """report.md, figures/*.png, study.json and analysis/ (the analyzer's outputs plus tracking.csv) under
    study.out; ``rerender``: only report.md and the figures, from a study read back by load_study."""
    from geometry.offline.outputs import write_analysis

    out = study.out
    if not rerender:
        write_analysis(study.analysis, out / "analysis")
        study.tracking.to_csv(out / "analysis" / "tracking.csv")
        save_study(study)
    V = views(study)
    cl = claims(study, V)
    figs = figures(study, V.all, out / "figures")
    path = out / "report.md"
    path.write_text(render(study, cl, V, figs))
    return path
