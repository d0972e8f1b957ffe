"""The demo report's account of its setting, stated before any verdict: the setup beside the paper's, the
evaluation noise, and the structure of the student's W0 at the analyzer's k."""

from __future__ import annotations

import math
from collections.abc import Mapping

from geometry.capture.store import read_snapshot
from geometry.lab.claims import UP, per_seed
from geometry.lab.pretrain import BASE_STEP
from geometry.lab.regimes import TrainResult
from geometry.lab.stats import Interval, interval
from geometry.lab.structure import FLAT_GAP, module_spectra
from geometry.lab.study import MAIN, ONE_SEED, SFT_BUDGET_GENERATIONS, StudyResult
from geometry.lab.task import POSTTRAIN_TASK, PRETRAIN_TASK, TEACHER_TASK
from geometry.offline.markdown import table
from geometry.offline.summary import RunSummary


def starting_points(study: StudyResult) -> list[tuple[str, TrainResult]]:
    """Each distinct W0 of the study, named, with the seed-0 run that starts from it."""
    if not study.reference:
        return [("the bf16 student every run starts from", next(iter(study.runs.values()))[0])]
    return [("the less-trained base SFT starts from (bf16)", study.runs["sft"][0]),
            ("seed 0's SFT checkpoint, where its OPD and RLVR start (bf16)", study.runs["opd"][0])]


def structure_lines(study: StudyResult) -> list[str]:
    """Before any verdict: per matrix type and starting point, W0's singular values above the Gavish-Donoho
    threshold and its gap at the analyzer's k (geometry.lab.structure); a flat spectrum said plainly."""
    lines = ["## W0: structure at k", "",
             "Measured before any verdict (geometry/lab/structure.py). *signal rank*: singular values of W0 above "
             "the Gavish-Donoho threshold for an unknown noise level, omega(beta) median(s), omega(beta) ~ 0.56 "
             "beta^3 - 0.95 beta^2 + 1.82 beta + 1.43, beta = min/max of the shape (docs/metrics.md item 12), one "
             "per layer; *threshold / s_1*: that threshold over the largest singular value, median over layers; "
             f"*s_k / s_k+1*: the gap at the analyzer's k = {study.boundaries.principal_k} (SPEC 2), median over "
             f"layers; *reading*: noise when most layers have no singular value above the threshold, flat at k when "
             f"the gap is below {FLAT_GAP}.", ""]
    for title, run in starting_points(study):
        lines += [f"W0 = {title}:", "", *_structure(run, study.boundaries.principal_k)]
    return lines


def _structure(first: TrainResult, k: int) -> list[str]:
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    spectra = sorted(module_spectra(read_snapshot(first.store, None), k),
                     key=lambda m: order.index(m.module) if m.module in order else len(order))

    def noise(m) -> bool:
        return sum(r == 0 for r in m.signal_ranks) > len(m.signal_ranks) / 2

    rows = [[m.module, f"{m.shape[0]} x {m.shape[1]}", ", ".join(map(str, m.signal_ranks)),
             f"{m.threshold_ratio:.2f}", f"{m.gap:.3f}",
             "noise" if noise(m) else f"signal; flat at k (gap < {FLAT_GAP})" if m.flat else "signal; gap at k"]
            for m in spectra]
    ranks = sorted(r for m in spectra for r in m.signal_ranks)
    words = [f"Signal rank of W0 over all {len(ranks)} matrices: {ranks[0]} to {ranks[-1]}, median "
             f"{ranks[len(ranks) // 2]}" + (f"; noise-like (no singular value above the threshold in most layers): "
                                           f"{', '.join(m.module for m in spectra if noise(m))}." if any(
                                               noise(m) for m in spectra) else ": every matrix type has structure "
                                           "above its noise bulk.")]
    flat = [m.module for m in spectra if m.flat and not noise(m)]
    if flat:
        words.append(f"Flat at k = {k} (s_k / s_k+1 < {FLAT_GAP}): {', '.join(flat)}. There the analyzer's top-k "
                     "subspace of W0 ends inside a continuum of nearly equal singular values, so principal angles, "
                     "overlaps and the principal mask measure mixing at an undefined boundary; read them as such.")
    few = [m.module for m in spectra if sorted(m.signal_ranks)[len(m.signal_ranks) // 2] < k]
    if few:
        words.append(f"Fewer than k = {k} singular values stand above the threshold in the median matrix of "
                     f"{', '.join(few)}: their top-k subspace holds noise directions beyond the signal.")
    return [table(["matrix", "shape", "signal rank per layer", "threshold / s_1", f"s_k / s_k+1 (k = {k})",
                   "reading"], rows), "", " ".join(words), ""]


# ---- tables ----


def setup_rows(study: StudyResult) -> list[list[str]]:
    """Every difference from the paper's setup, with its reason."""
    cfg, lrs, bd = study.config, study.lrs, study.boundaries
    params = measured_params(study)
    return [
        ["student", "Qwen3-8B (bf16 checkpoint)", f"Llama, hidden 128, 4 layers ({params:,} parameters in the "
         f"measured matrices), pretrained to convergence on {PRETRAIN_TASK.words()}, rounded to bf16",
         "fits a 2-core CPU in minutes; a broad pretraining distribution gives W0 structure (section above)"],
        ["starting point", "SFT from the base model; OPD and RLVR from the SFT model (its appendices)",
         "SFT from the less-trained base (the student's pretraining at step "
         f"{BASE_STEP}, rounded to bf16); OPD and RLVR from each seed's SFT checkpoint, rounded to bf16"
         if study.reference else "all runs from the pretrained student",
         "the paper's pipeline" if study.reference else "one starting point keeps the regimes comparable"],
        ["teacher", "Qwen3-32B", f"Llama, hidden 192, pretrained on {TEACHER_TASK.words()}, then on the "
         "post-training task",
         f"has something to teach: {_teacher_words(study)}"],
        ["task, reward", "math reasoning, verifiable", f"post-training on {POSTTRAIN_TASK.words()} (shifted from "
         "the student's pretraining to long operands), exact answer (0/1)", "verifiable and cheap; the student "
         "starts part-way"],
        ["lr", "SFT 1e-5, OPD and RLVR 1e-6", f"SFT {lrs['sft']:.3g}, OPD and RLVR {lrs['opd']:.3g}",
         "same ratio of lr to bf16 spacing as the paper (section below)"],
        ["schedule", "SFT cosine; OPD, RLVR not stated", "SFT cosine, OPD and RLVR constant, no warm-up",
         "as stated; constant where the paper says nothing"],
        ["steps", "SFT 5375, RLVR 1023, OPD 299", ", ".join(f"{UP[n]} {study.runs[n][0].steps}" for n in MAIN)
         if study.reference else f"{cfg.steps} for every regime",
         "the paper's counts; 10 bf16 snapshots a run" if study.reference else "time budget (5 seeds in 20 min on "
         "2 cores); the paper's OPD count; equal steps keep the regimes comparable"],
        ["batch", "8 samples per prompt (batch sizes in its appendices)", f"{cfg.batch} prompts x {cfg.generations} "
         "samples per "
         f"step (SFT and the full-KL variant: {cfg.sequences} prompts" + (
             f"; the variant opd_sftlr {_shape('opd_sftlr', study)})" if "opd_sftlr" in study.runs else ")"),
         "time budget; 8 samples as the paper"],
        ["optimizer", "AdamW (0.9, 0.98), wd 0.1, RLVR eps 1e-15", "the same; gradient clipping 1.0",
         "the paper's; clipping is TRL's default (the paper does not state one)"],
        ["RLVR", "GRPO, zero-variance batches skipped", "GRPO (TRL), zero-variance prompt groups dropped from the "
         "loss, an all-flat step skipped", "the paper's filter at group level (DAPO-style, no refill)"],
        ["OPD", "student samples, A = -(log p_s - log p_t) per token", "the same, as a TRL GRPOTrainer subclass "
         "(lab/trainers.py)", "-"],
        ["precision", "bf16 checkpoints", "float32 master weights from a bf16 student; bf16 snapshots analysed; "
         "per-step tracking and accuracy on the float32 weights", "as mixed-precision training saves checkpoints"],
        ["K (locking)", "16, just below OPD's update stable rank", _k_words(bd), "the paper's rule on this model"],
        ["k, r, alpha", "512, 64 of 4096; 30%", f"k = {bd.principal_k}, r = round(64 h / 4096), alpha "
         f"{study.analysis.config.alpha:g}", "SPEC 2, 5: scaled with the hidden size"],
        ["matrices", "trajectories on attention q/k/v/o", "the same for Sim_K, stable rank and onset; sparsity, "
         "masks, angles, NSS over all Linear weights (embeddings and lm_head left out)", "-"],
        ["seeds", "one run each", f"{max(len(v) for v in study.runs.values())} seeds per run of a verdict "
         f"(variants {', '.join(ONE_SEED)}: seed 0 only)", "paired t-tests over seeds decide "
         "the verdicts (runs of one seed share data order and prompts)"],
    ]


def gain(study: StudyResult, name: str) -> tuple[float, float, Interval]:
    """A run's mean starting accuracy p0 over its seeds, one accuracy's binomial sd there on the evaluation
    problems, and its gain over its start (accuracy after - before, by seed) as a mean and 95% interval."""
    rs = study.runs[name]
    p0 = sum(r.acc_before for r in rs) / len(rs)
    g = interval([r.acc_after - r.acc_before for r in rs])
    return p0, math.sqrt(p0 * (1 - p0) / study.config.eval_problems), g


def noise_words(study: StudyResult) -> str:
    """The evaluation noise (binomial sd of one accuracy at each regime's starting accuracy) and each main regime's
    gain over its start against it."""
    n = study.config.eval_problems
    gains = []
    for name in ("opd", "rlvr", "sft"):
        if name in study.runs:
            p0, sd, g = gain(study, name)
            gains.append(f"{UP[name]} from {100 * p0:.1f}%: {points(g)}" + (
                f" ({g.mean / sd:.1f} sd; one accuracy's binomial sd there {100 * sd:.1f} points)" if sd > 0 else ""))
    return (f"Evaluation noise: one accuracy on {n} problems has a binomial sd of sqrt(p (1 - p) / {n}) at its "
            f"level p (95%: +-1.96 sd). Gain over the run's start, points, mean over seeds [95% interval] (in "
            f"binomial sds at the start): {'; '.join(gains)}.")


TEACHING_RUNS = ("opd", "opd_sftlr", "opd_fullkl", "sft")  # the teaching section's rows, those the study ran


def teaching_lines(study: StudyResult, S: Mapping[str, RunSummary]) -> list[str]:
    """Does the teacher teach? Each OPD run's gain over its start, beside SFT's, at its learning rate and batch
    shape, read against the evaluation noise by a rule fixed before the run: a gain is clear when its 95%
    interval over seeds lies above one binomial sd of one accuracy at the start. With the SFT-budget variant, its
    update's bf16 sparsity and principal-mask overlap beside SFT's and OPD's (``S``: summaries by run label),
    which separates what the learning rate does to them from what the estimator does."""
    rows, clear = [], {}
    for name in (n for n in TEACHING_RUNS if n in study.runs):
        _, sd, g = gain(study, name)
        clear[name] = g.n >= 2 and g.lo > sd
        rows.append([name, f"{study.runs[name][0].lr:.3g}", _shape(name, study), points(g),
                     f"{g.mean / sd:.1f}" if sd > 0 else "n/a",
                     ("clear" if clear[name] else "not clear") if g.n >= 2 else "one seed: not read"])
    words = []
    if "opd" in clear:
        words.append("At the paper's learning rates OPD's gain is " + ("clear." if clear["opd"] else "not clear."))
    if "opd_sftlr" in clear:
        words.append(
            f"opd_sftlr is a labelled variant in no verdict: OPD at SFT's learning rate, {_shape('opd_sftlr', study)} "
            f"prompts x samples a step (the same number of sequences; at {study.config.batch} prompts a step OPD's "
            "updates follow the few problems of each step, data/README.md measures the two changes apart). Its gain "
            "is " + ("clear" if clear["opd_sftlr"] else "not clear either") + (
                ": the teacher teaches once OPD has SFT's update budget, so at the paper's rates what OPD lacks "
                "is that budget (its lr is a tenth of SFT's), not a teacher." if clear["opd_sftlr"] and not
                clear.get("opd", True) else "."))
        sparsity = {n: _final(study, S, n, "sparsity_bf16") for n in ("opd_sftlr", "sft", "opd")}
        words.append(f"At SFT's learning rate OPD's update is {_geometry(study, S, 'opd_sftlr')}; SFT's "
                     f"{_geometry(study, S, 'sft')}; OPD's at its own {_geometry(study, S, 'opd')}." + (
                         " Its sparsity is nearer SFT's than OPD's: in this model the learning rate, more than the "
                         "estimator, sets how many bf16 entries an update changes." if abs(
                             sparsity["opd_sftlr"].mean - sparsity["sft"].mean) < abs(
                             sparsity["opd_sftlr"].mean - sparsity["opd"].mean) else ""))
    return ["## Does the teacher teach?", "",
            table(["run", "lr", "prompts x samples a step", "gain (points)", "gain / sd", "reading"], rows), "",
            "*gain*: accuracy after minus before, mean over seeds [95% interval]; *sd*: the binomial sd of one "
            "accuracy at the run's start; *clear*: the interval lies above one sd (a rule fixed before the run). "
            + " ".join(words)]


def _final(study: StudyResult, S: Mapping[str, RunSummary], name: str, metric: str) -> Interval:
    return interval(list(per_seed(study, S, name, lambda s: s.final(metric)).values()))


def _geometry(study: StudyResult, S: Mapping[str, RunSummary], name: str) -> str:
    return (f"{_final(study, S, name, 'sparsity_bf16').show('%')}% bf16-sparse with a principal-mask overlap of "
            f"{_final(study, S, name, 'mask_overlap_principal').show('%')}%")


def _shape(name: str, study: StudyResult) -> str:
    cfg = study.config
    if name == "opd_sftlr":
        return f"{cfg.sequences // SFT_BUDGET_GENERATIONS} x {SFT_BUDGET_GENERATIONS}"
    if name in ("sft", "opd_fullkl"):
        return f"{cfg.sequences} x 1"
    return f"{cfg.batch} x {cfg.generations}"


def _teacher_words(study: StudyResult) -> str:
    opd = study.runs["opd"]
    start = sum(r.acc_before for r in opd) / len(opd)
    return (f"{100 * study.teacher_accuracy:.1f}% on the post-training task, where OPD starts at {100 * start:.1f}%"
            if math.isfinite(study.teacher_accuracy) else f"OPD starts at {100 * start:.1f}% on the post-training task")


def _k_words(bd) -> str:
    if bd.lock_k < math.ceil(bd.opd_stable_rank) - 1:
        return (f"{bd.lock_k}, capped (the recorder tracks {bd.lock_k} directions; the paper's value): OPD's float32 "
                f"update stable rank is {bd.opd_stable_rank:.2f}")
    return f"{bd.lock_k}, just below OPD's float32 update stable rank {bd.opd_stable_rank:.2f}"


def measured_params(study: StudyResult) -> int:
    first = study.analysis.rows[0]
    return sum(int(r.value) for r in study.analysis.where(run=first.run, step=first.step, metric="n_params"))


def trainer_name(name: str) -> str:
    base = name.removesuffix("_proj")
    t = {"sft": "TRL SFTTrainer", "rlvr": "RLVRTrainer (TRL GRPO)", "opd": "OPDTrainer (TRL GRPO)",
         "opd_offpolicy": "OPDTrainer, teacher rollouts", "opd_mix0.05": "OPDTrainer, alpha 0.05",
         "opd_mix0.5": "OPDTrainer, alpha 0.5", "opd_fullkl": "TRL DistillationTrainer (full-vocabulary KL)",
         "opd_sftlr": "OPDTrainer, SFT's lr, groups of 2"}
    return t.get(base, "") + (" + projection" if name.endswith("_proj") else "")


def points(x: Interval) -> str:
    """An interval of accuracies (0-1) in points, one decimal."""
    return x.scaled(100).show("pts") if x.n else "n/a"
