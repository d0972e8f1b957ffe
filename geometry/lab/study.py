"""The miniature study behind ``geometry demo``: train every run for several seeds, analyze, report.

From one student and one teacher (``data_dir``: ``--data``, else $GEOMETRY_DATA, else the repository's
data/), with TRL trainers and our callback (geometry.lab.regimes):
- the three regimes: SFT, RLVR (GRPO), OPD (the paper's sampled-token estimator);
- the paper's controls: off-policy OPD (teacher rollouts) and OPD's advantage mixed with GRPO's (alpha 0.05);
- the causal test (SPEC 9): SFT and OPD with gradients projected on the rank-K update subspace from 20%;
- labelled variants, in no verdict: TRL's full-vocabulary DistillationTrainer (seed 0), and OPD with SFT's update
  budget (every seed): SFT's learning rate, 16 prompts x 2 samples a step (the same 32 sequences), which asks
  whether the teacher teaches once OPD may move the weights as far as SFT does (data/README.md).

K follows the paper's rule (docs/metrics.md item 7): just below OPD's measured update stable rank, here measured
on the attention matrices of OPD's final float32 update (the per-step tracking), before the projected runs
(which need K) are trained.
The student is already trained on the task, so it plays the part of the paper's SFT anchor from which OPD
and RLVR start; all runs here start from it.

The reference study (``--reference``) follows the paper's pipeline and step counts instead: SFT from a less-trained
base (the student's pretraining checkpoint half-way, data/base) for 5375 steps with cosine decay, then OPD (299 steps)
and RLVR (1023) from each seed's SFT checkpoint, rounded to bf16, with 10 snapshots a run; the projected twins of
SFT and OPD as in the default study, and no controls. Its report is committed under docs/study/.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.capture.store import check_store, read_snapshot, read_tracking
from geometry.capture.trajectory import tracking_table
from geometry.errors import GeometryError
from geometry.lab import regimes
from geometry.lab.config import DATA_ENV, StudyConfig
from geometry.lab.regimes import TRACK_K, RegimeConfig, TrainResult
from geometry.offline.analyze import Analysis, Run, analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.summary import ATTENTION_MODULES
from geometry.progress import around_bars
from geometry.progress import bar as progress_bar
from geometry.selection import module_of
from geometry.table import Table

REPO_DATA = Path(__file__).resolve().parents[2] / "data"
INSTALLED_DATA = Path(sys.prefix) / "share" / "geometry" / "data"  # where a wheel puts data/ (pyproject data-files)
MARKER = ".geometry-demo"  # marks a directory as a demo output, which a new demo may overwrite
MAIN = ("sft", "rlvr", "opd")
CONTROLS = ("opd_offpolicy", "opd_mix0.05")  # compared with on-policy "opd"
PROJECTED = {"sft_proj": "sft", "opd_proj": "opd"}  # projected run -> its unconstrained run
VARIANTS = ("opd_fullkl", "opd_sftlr")  # shown, in no verdict (plan() also has "opd_mix0.5", in no default list)
ONE_SEED = ("opd_fullkl",)  # variants trained at seed 0 only
SFT_BUDGET_GENERATIONS = 2  # opd_sftlr's samples per prompt: the most prompts a step a group can give
# The reference study (--reference): the paper's step counts (its appendices), SFT from a less-trained base, OPD and
# RLVR from each seed's SFT checkpoint; projected runs take their unconstrained run's count.
REFERENCE_STEPS = {"sft": 5375, "rlvr": 1023, "opd": 299}
REFERENCE_SNAPSHOTS = 10  # bf16 snapshots a run (the default study takes 5)
REFERENCE_QUICK = 25  # --quick --reference: every count divided by this (a smoke test of the pipeline)


class Boundaries(NamedTuple):
    """How K was picked, and whether the student's spectra have a boundary at k and K at all."""

    lock_k: int  # K: the largest integer below OPD's update stable rank (at most TRACK_K)
    opd_stable_rank: float  # of OPD's final float32 update (per-step tracking): median over attention, mean over seeds
    update_gap: float  # s_K / s_{K+1} of that update (tracked values), median over the same matrices and seeds
    principal_k: int  # the analyzer's k of W0 (round(512 h / 4096))
    base_gap: float  # s_k / s_{k+1} of W0, median over the attention matrices
    opd_stable_rank_bf16: float = math.nan  # the same from the final bf16 checkpoint, shown beside it


class StudyResult(NamedTuple):
    """Everything the report needs."""

    out: Path
    runs: dict[str, list[TrainResult]]  # by run name, one per seed, in training order
    analysis: Analysis  # bf16 snapshots of every run and seed (label "name/sSEED"), side by side
    tracking: Table  # per-step tracking curves at K (track_* metrics), same labels
    config: RegimeConfig  # the regimes' size; lock_k = K
    lrs: dict[str, float]  # learning rate by regime
    boundaries: Boundaries
    seconds: float
    reference: bool = False  # the reference study: SFT from the base, OPD and RLVR from its checkpoints
    teacher_accuracy: float = math.nan  # on the evaluation problems


def label(name: str, seed: int) -> str:
    return f"{name}/s{seed}"


def data_dir(data: str | Path | None = None) -> Path:
    """Where the student and teacher live: ``data`` if given, else $GEOMETRY_DATA, else the repository's data/,
    else an installed wheel's <prefix>/share/geometry/data. A directory without both models is a GeometryError
    saying how to rebuild them (a given one is never passed over for another)."""
    given = data or os.environ.get(DATA_ENV)
    candidates = [Path(given)] if given else [REPO_DATA, INSTALLED_DATA]
    for root in candidates:
        if all((root / kind / "config.json").is_file() for kind in ("student", "teacher")):
            return root
    root = candidates[0]
    kind = next(k for k in ("student", "teacher") if not (root / k / "config.json").is_file())
    raise GeometryError(f"{root / kind}: no model here (looked in --data, ${DATA_ENV}, {REPO_DATA}, "
                        f"{INSTALLED_DATA}); rebuild with `geometry lab pretrain --out {root}`")


def prepare_out(out: Path) -> None:
    """A new or empty directory, or a previous demo's output (replaced); anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise GeometryError(f"{out} exists and is not a geometry demo output; choose another -o")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("geometry demo output; `geometry demo` may overwrite this directory\n")


def plan(student: Path, teacher: Path, runs_dir: Path, cfg: RegimeConfig, names: tuple[str, ...],
         keep: Path | None = None) -> dict[str, Callable[[], TrainResult]]:
    """The named runs at cfg's seed, each as a call that trains and records it; ``keep``: where SFT saves its
    trained model."""
    def store(name: str) -> Path:
        return runs_dir / name / f"s{cfg.seed}"

    calls = {
        "sft": lambda: regimes.train_sft(student, store("sft"), cfg, name="sft", keep=keep),
        "rlvr": lambda: regimes.train_rlvr(student, store("rlvr"), cfg, name="rlvr"),
        "opd": lambda: regimes.train_opd(student, teacher, store("opd"), cfg, name="opd"),
        "opd_offpolicy": lambda: regimes.train_opd(student, teacher, store("opd_offpolicy"), cfg,
                                                   name="opd_offpolicy", off_policy=True),
        "opd_mix0.05": lambda: regimes.train_opd(student, teacher, store("opd_mix0.05"), cfg, name="opd_mix0.05",
                                                 alpha=0.05),
        "opd_mix0.5": lambda: regimes.train_opd(student, teacher, store("opd_mix0.5"), cfg, name="opd_mix0.5",
                                                alpha=0.5),
        "opd_fullkl": lambda: regimes.train_opd_fullkl(student, teacher, store("opd_fullkl"), cfg),
        "opd_sftlr": lambda: regimes.train_opd(student, teacher, store("opd_sftlr"), sft_budget(cfg, student),
                                               name="opd_sftlr"),
        "sft_proj": lambda: regimes.train_sft(student, store("sft_proj"), cfg, name="sft_proj", projection=True),
        "opd_proj": lambda: regimes.train_opd(student, teacher, store("opd_proj"), cfg, name="opd_proj",
                                              projection=True),
    }
    return {n: calls[n] for n in names}


def sft_budget(cfg: RegimeConfig, student: Path) -> RegimeConfig:
    """OPD's size with SFT's update budget: SFT's learning rate, and as many prompts a step as groups of two
    allow within the same ``cfg.sequences`` sequences (SFT takes that many prompts; at 4 prompts a step OPD's
    updates follow the few problems of each step; measured in data/README.md)."""
    lr = regimes.learning_rates(cfg, student)["sft"]
    return replace(cfg, lr=lr, batch=cfg.sequences // SFT_BUDGET_GENERATIONS, generations=SFT_BUDGET_GENERATIONS)


def _run(jobs: list[Job], after: Callable[[TrainResult], list[Job]], teacher: Path, runs_dir: Path,
         pool: ProcessPoolExecutor | None, done: Callable[[TrainResult], None]) -> None:
    """Train ``jobs`` and the jobs each result unlocks (``after``: the reference study's OPD and RLVR once their
    seed's SFT is trained), in the pool's processes when there is one, so no worker idles while a run it could
    start waits for a stage to end. ``done`` gets each result as it finishes."""
    if pool is None:
        queue = list(jobs)
        while queue:
            res = _train_one(queue.pop(0), teacher, runs_dir)
            done(res)
            queue += after(res)
        return
    running = {pool.submit(_train_one, j, teacher, runs_dir) for j in jobs}
    while running:
        finished, running = wait(running, return_when=FIRST_COMPLETED)
        for f in finished:
            res = f.result()
            done(res)
            running |= {pool.submit(_train_one, j, teacher, runs_dir) for j in after(res)}


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` fresh processes (spawned: no forked torch thread pools), each run single-threaded, so the
    results are the same as one by one; None for one worker. On an error or Ctrl-C the workers are stopped
    at once rather than left to finish their runs."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        procs = list((pool._processes or {}).values())  # no public handle on the workers
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        raise
    pool.shutdown()


def _svals(d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(d.double())


def boundaries(opd: list[TrainResult], hidden: int) -> Boundaries:
    """K by the paper's rule (docs/metrics.md item 7) from OPD's final float32 updates of the attention matrices
    (the per-step tracking: ||D||_F exact, top singular values tracked), and the spectral gaps at K (of those
    updates) and at the analyzer's k (of W0). The bf16 checkpoint's stable rank is kept beside it: there
    rounding leaves most entries unchanged and moves the rest by whole bf16 spacings, which spreads energy."""
    srs, srs_bf16, tracked, base_gaps = [], [], [], []
    for res in opd:
        base, final = read_snapshot(res.store, None), read_snapshot(res.store, res.steps)
        attn = [n for n in base if module_of(n) in ATTENTION_MODULES]
        srs_bf16.append(float(torch.tensor([_stable_rank(_svals(final[n].float() - base[n].float()))
                                            for n in attn]).median()))
        last = read_tracking(res.store, check_store(res.store).tracking_steps[-1])
        ests = [last[n] for n in attn if n in last and last[n].fro > 0]
        srs.append(float(torch.tensor([e.fro ** 2 / float(e.s[0]) ** 2 for e in ests]).median()))
        tracked.append(ests)
        if not base_gaps:
            base_gaps = [_svals(base[n].float()) for n in attn]
    sr = sum(srs) / len(srs)
    k_lock = max(1, min(TRACK_K, math.ceil(sr) - 1))
    upd = [float(e.s[k_lock - 1] / e.s[k_lock]) for ests in tracked for e in ests if len(e.s) > k_lock]
    k = max(1, round(512 * hidden / 4096))
    return Boundaries(k_lock, sr, float(torch.tensor(upd).median()) if upd else math.nan, k,
                      float(torch.tensor([float(s[k - 1] / s[k]) for s in base_gaps]).median()),
                      sum(srs_bf16) / len(srs_bf16))


def _stable_rank(s: torch.Tensor) -> float:
    return float((s ** 2).sum() / s[0] ** 2)


TRACKED_ROWS = 500  # tracked steps a run keeps in the study's table: every step up to this, else evenly spaced


def tracking_at(res: TrainResult, k: int) -> Table:
    """Per-step tracking curves of one run at K = k, from the top k of the recorder's TRACK_K columns
    (geometry.capture.trajectory.tracking_table): every tracked step of a run of up to TRACKED_ROWS steps; of a
    longer one (the reference study's SFT: 5375), TRACKED_ROWS steps evenly spaced, first and last included, which
    keeps the table the size of the default study's."""
    steps = check_store(res.store).tracking_steps
    if len(steps) > TRACKED_ROWS:
        steps = sorted({steps[round(i * (len(steps) - 1) / (TRACKED_ROWS - 1))] for i in range(TRACKED_ROWS)})
    return tracking_table(res.store, run=label(res.name, res.seed), lock_k=k, steps=steps)


STUDY_JSON = "study.json"  # the runs' results and the study's choices, so a report can be re-rendered


def save_study(study: StudyResult) -> Path:
    """study.json beside the analysis: everything of a StudyResult that analysis/ does not hold."""
    doc = {"runs": {n: [{**r._asdict(), "store": str(r.store.relative_to(study.out))} for r in rs]
                    for n, rs in study.runs.items()},
           "config": asdict(study.config), "lrs": study.lrs, "boundaries": study.boundaries._asdict(),
           "seconds": study.seconds, "reference": study.reference, "teacher_accuracy": study.teacher_accuracy}
    path = study.out / STUDY_JSON
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_study(out: str | Path) -> StudyResult:
    """A finished demo output read back (study.json, analysis/, analysis/tracking.csv), e.g. to re-render it."""
    from geometry.offline.outputs import load

    out = Path(out)
    if not (out / STUDY_JSON).is_file():
        raise GeometryError(f"{out}: no {STUDY_JSON}; not a finished geometry demo output")
    doc = json.loads((out / STUDY_JSON).read_text())
    runs = {n: [TrainResult(**{**r, "store": out / r["store"]}) for r in rs] for n, rs in doc["runs"].items()}
    return StudyResult(out, runs, load(out / "analysis"), Table.from_csv(out / "analysis" / "tracking.csv"),
                       RegimeConfig(**doc["config"]), doc["lrs"], Boundaries(**doc["boundaries"]), doc["seconds"],
                       doc.get("reference", False), doc.get("teacher_accuracy", math.nan))


def run_study(out: str | Path, config: StudyConfig | None = None, *,
              log: Callable[[str], None] = print, progress: bool = False) -> StudyResult:
    """Train, record, analyze. Seeded: the same config gives the same numbers. ``progress``: a bar over the
    training runs, then one over the analysis, each with an ETA, when stderr is a terminal (geometry.progress)."""
    with _no_library_bars():
        return _study(Path(out), config or StudyConfig(), log, progress)


@contextmanager
def _no_library_bars() -> Iterator[None]:
    """transformers' model-loading bars off (they would reach logs and pipes too): the study draws its own."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class Job(NamedTuple):
    """One training run of the study: which regime, seed and size, and where it starts."""

    name: str
    cfg: RegimeConfig  # its size; seed = the training seed
    student: Path  # the model it starts from
    keep: Path | None = None  # where to save the trained model when a later run starts from it


def _train_one(job: Job, teacher: Path, runs_dir: Path) -> TrainResult:
    return plan(job.student, teacher, runs_dir, job.cfg, (job.name,), keep=job.keep)[job.name]()


def demo_job(sc: StudyConfig, student: Path) -> tuple[RegimeConfig, Callable[[str, int, RegimeConfig], Job]]:
    """The default study's size, and a run's job: every run starts from the shipped student."""
    cfg = RegimeConfig.quick() if sc.quick else RegimeConfig()
    cfg = cfg if sc.steps is None else replace(cfg, steps=sc.steps)
    return cfg, lambda name, seed, rc: Job(name, replace(rc, seed=seed), student)


def reference_job(sc: StudyConfig, base: Path, checkpoints: Path) -> Callable[[str, int, RegimeConfig], Job]:
    """A run of the reference study: SFT (and its projected twin) from the less-trained base, kept per seed;
    OPD, RLVR (and OPD's projected twin) from that seed's SFT checkpoint; each at the paper's step count
    (REFERENCE_STEPS, a REFERENCE_QUICK-th of it with --quick) and REFERENCE_SNAPSHOTS snapshots."""
    def job(name: str, seed: int, rc: RegimeConfig) -> Job:
        regime = PROJECTED.get(name, name)
        steps = max(1, round(REFERENCE_STEPS[regime] / (REFERENCE_QUICK if sc.quick else 1)))
        cfg = replace(rc, seed=seed, steps=steps, snapshot_every=max(1, steps // REFERENCE_SNAPSHOTS))
        if regime == "sft":
            return Job(name, cfg, base, checkpoints / label("sft", seed) if name == "sft" else None)
        return Job(name, cfg, checkpoints / label("sft", seed))
    return job


def _study(out: Path, sc: StudyConfig, log: Callable[[str], None], progress: bool) -> StudyResult:
    t0 = time.perf_counter()
    data = data_dir(sc.data)
    student, teacher = data / "student", data / "teacher"
    prepare_out(out)
    seeds = range(sc.n_seeds)
    unlocks: dict[str, tuple[str, ...]] = {}  # run name -> the runs of its seed that start from its result
    if sc.reference:
        student = data / "base"
        if not (student / "config.json").is_file():
            raise GeometryError(f"{student}: no less-trained base here; rebuild with `geometry lab pretrain --out "
                                f"{data}`")
        cfg = RegimeConfig.quick() if sc.quick else RegimeConfig()
        job = reference_job(sc, student, out / "checkpoints")
        first = [("sft", s) for s in seeds]
        unlocks = {"sft": ("rlvr", "opd")}
    else:
        cfg, job = demo_job(sc, student)
        first = [(n, s) for s in seeds for n in (*MAIN, *CONTROLS)]
        first += [] if sc.no_variants or sc.quick else [(n, s) for n in VARIANTS for s in seeds
                                                         if s == 0 or n not in ONE_SEED]
    lr = regimes.learning_rates(cfg, student)
    log(f"learning rates by the precision rule: SFT {lr['sft']:.3g}, " + (
        "RLVR and OPD from each SFT checkpoint" if sc.reference else f"RLVR and OPD {lr['opd']:.3g}"))
    results: dict[str, list[TrainResult]] = {}
    runs = len(first) + sum(len(unlocks.get(n, ())) for n, _ in first)
    bar = progress_bar(runs + len(PROJECTED) * len(seeds), "training", "run", progress)
    log = around_bars(log)

    def done(res: TrainResult) -> None:
        results.setdefault(res.name, []).append(res)
        bar.update(1)
        log(f"  {res.name}, seed {res.seed}: accuracy {100 * res.acc_before:.1f}% -> {100 * res.acc_after:.1f}% "
            f"({res.steps} steps in {res.seconds:.0f} s, lr {res.lr:.3g})")

    with _pool(sc.jobs) as pool, bar:
        log(f"training {runs} runs, {sc.jobs} at a time")
        _run([job(n, s, cfg) for n, s in first], lambda res: [job(n, res.seed, cfg) for n in unlocks.get(res.name, ())],
             teacher, out / "runs", pool, done)
        hidden = int(regimes.load_model(student).config.hidden_size)
        bounds = boundaries(sorted(results["opd"], key=lambda r: r.seed), hidden)
        cfg = replace(cfg, lock_k=bounds.lock_k)
        log(f"K = {bounds.lock_k} (OPD's update stable rank {bounds.opd_stable_rank:.2f}, attention matrices, float32 "
            f"weights; K is the largest integer below it, at most {TRACK_K})")
        log(f"training {len(PROJECTED) * len(seeds)} projected runs")
        _run([job(n, s, cfg) for s in seeds for n in PROJECTED], lambda res: [], teacher, out / "runs", pool, done)
    order = [*MAIN, *CONTROLS, *VARIANTS, *PROJECTED]  # the report's order of runs, each run's seeds ascending
    results = {n: sorted(results[n], key=lambda r: r.seed) for n in order if n in results}
    lrs = {name: results[name][0].lr for name in MAIN}
    log("analyzing the bf16 snapshots of every run")
    stores = [r for rs in results.values() for r in rs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small decompositions: one thread avoids OpenMP waits on a busy machine
    try:
        analysis = analyze([Run(label(r.name, r.seed), r.store / "base", [r.store]) for r in stores],
                           config=AnalysisConfig(lock_k=bounds.lock_k, device="cpu"), progress=progress)
        tracking = Table(row for r in stores for row in tracking_at(r, bounds.lock_k))
    finally:
        torch.set_num_threads(threads)
    return StudyResult(out, results, analysis, tracking, cfg, lrs, bounds, time.perf_counter() - t0, sc.reference,
                       regimes.teacher_accuracy(teacher, cfg.eval_problems))
