"""The miniature study behind ``geometry demo``: train every run, analyze, report.

From one student (data/student) and one teacher (data/teacher):
- the three regimes, each with TRL's trainer and our callback: SFT, RLVR (GRPO), OPD (distillation);
- the paper's controls, by a compact loop (regimes.train_opd_loop): on-policy OPD (the loop's own
  reference), off-policy OPD (teacher rollouts), advantage mixes alpha in {0.5, 0.05};
- the causal test (SPEC 9): SFT and OPD with gradients projected on the rank-K subspace from 20% on.

The student is already trained on the task, so it plays the part of the paper's SFT anchor from
which OPD and RLVR start; all runs here start from it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from geometry.capture.trajectory import tracking_table
from geometry.errors import GeometryError
from geometry.lab import regimes
from geometry.lab.regimes import RegimeConfig, TrainResult
from geometry.offline.analyze import Analysis, Run, analyze
from geometry.offline.config import AnalysisConfig
from geometry.table import Table

DATA = Path(__file__).resolve().parents[2] / "data"
MARKER = ".geometry-demo"  # marks a directory as a demo output, which a new demo may overwrite
MAIN = ("sft", "rlvr", "opd")
CONTROLS = ("opd_loop", "opd_offpolicy", "opd_mix0.5", "opd_mix0.05")
PROJECTED = {"sft_proj": "sft", "opd_proj": "opd"}  # projected run -> its unconstrained run


class StudyResult(NamedTuple):
    """Everything the report needs."""

    out: Path
    runs: dict[str, TrainResult]  # by run name, in training order
    analysis: Analysis  # snapshots of every run, analyzed side by side
    tracking: Table  # per-step tracking curves of every run (track_* metrics)
    config: RegimeConfig
    seconds: float


def prepare_out(out: Path) -> None:
    """A new or empty directory, or a previous demo's output (replaced); anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise GeometryError(f"{out} exists and is not a geometry demo output; choose another -o")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("geometry demo output; `geometry demo` may overwrite this directory\n")


def plan(student: Path, teacher: Path, runs_dir: Path, cfg: RegimeConfig) -> dict[str, Callable[[], TrainResult]]:
    """Every run of the study, by name, as a call that trains and records it."""

    def store(name: str) -> Path:
        return runs_dir / name

    return {
        "sft": lambda: regimes.train_sft(student, store("sft"), cfg, name="sft"),
        "rlvr": lambda: regimes.train_rlvr(student, store("rlvr"), cfg, name="rlvr"),
        "opd": lambda: regimes.train_opd(student, teacher, store("opd"), cfg, name="opd"),
        "opd_loop": lambda: regimes.train_opd_loop(student, teacher, store("opd_loop"), cfg, name="opd_loop"),
        "opd_offpolicy": lambda: regimes.train_opd_loop(student, teacher, store("opd_offpolicy"), cfg,
                                                        name="opd_offpolicy", off_policy=True),
        "opd_mix0.5": lambda: regimes.train_opd_loop(student, teacher, store("opd_mix0.5"), cfg,
                                                     name="opd_mix0.5", alpha=0.5),
        "opd_mix0.05": lambda: regimes.train_opd_loop(student, teacher, store("opd_mix0.05"), cfg,
                                                      name="opd_mix0.05", alpha=0.05),
        "sft_proj": lambda: regimes.train_sft(student, store("sft_proj"), cfg, name="sft_proj", projection=True),
        "opd_proj": lambda: regimes.train_opd(student, teacher, store("opd_proj"), cfg, name="opd_proj",
                                              projection=True),
    }


def run_study(out: str | Path, *, quick: bool = False, student: Path | None = None, teacher: Path | None = None,
              log: Callable[[str], None] = print) -> StudyResult:
    """Train, record, analyze. Seeded: the same size gives the same numbers."""
    t0 = time.perf_counter()
    out = Path(out)
    student, teacher = student or DATA / "student", teacher or DATA / "teacher"
    for path in (student, teacher):
        if not (path / "config.json").is_file():
            raise GeometryError(f"{path}: no model here; rebuild with `geometry lab pretrain --out {path.parent}`")
    prepare_out(out)
    cfg = RegimeConfig.quick() if quick else RegimeConfig.default()
    calls = plan(student, teacher, out / "runs", cfg)
    results: dict[str, TrainResult] = {}
    for i, (name, call) in enumerate(calls.items(), 1):
        log(f"[{i}/{len(calls)}] training {name} ({cfg.steps} steps)")
        res = call()
        results[name] = res
        log(f"      accuracy {100 * res.acc_before:.1f}% -> {100 * res.acc_after:.1f}% in {res.seconds:.0f} s")
    log("analyzing the snapshots of every run")
    analysis = analyze([Run(name, res.store / "base", [res.store]) for name, res in results.items()],
                       config=AnalysisConfig(lock_k=cfg.lock_k, device="cpu"))
    tracking = Table(row for name, res in results.items() for row in tracking_table(res.store, run=name))
    return StudyResult(out, results, analysis, tracking, cfg, time.perf_counter() - t0)
