"""Runs opened and checked, their matrices chosen, before anything is measured (``plan``), and the runs whose
bases are one model grouped to share its decomposition (``cohorts``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from geometry.errors import GeometryError
from geometry.offline.config import AnalysisConfig
from geometry.offline.matrices import MatrixSpec, select_matrices
from geometry.offline.sources import Checkpoint, TensorSource, open_base, open_run, same_tensors
from geometry.selection import Coverage


class Run(NamedTuple):
    """One training run to analyze: its label, its base model, and checkpoint paths (files, model
    dirs or Trainer output dirs with checkpoint-N folders).

    Examples
    --------
    >>> from geometry import Run
    >>> Run("sft", "Qwen/Qwen3-8B", ["runs/sft"])
    Run(label='sft', base='Qwen/Qwen3-8B', checkpoints=['runs/sft'])
    """

    label: str
    base: str | Path
    checkpoints: Sequence[str | Path]


class Plan(NamedTuple):
    """A run opened and checked, its matrices chosen, before anything is measured."""

    run: Run
    base: Checkpoint
    ckpts: list[Checkpoint]
    matrices: list[MatrixSpec]
    hidden: int | None
    notes: list[str]  # on its sources and the matrices skipped
    coverage: Coverage  # the share of the base's parameters the matrices hold, what they leave out


def plan_run(run: Run, cfg: AnalysisConfig) -> Plan:
    """The run's base and checkpoints opened, its matrices selected (``select_matrices``), nothing read."""
    base = open_base(run.base, allow_pickle=cfg.allow_pickle)
    ckpts = open_checkpoints(run, cfg, base.source)
    notes = [f"{run.label}: {note}" for source in (base.source, *(c.source for c in ckpts)) for note in source.notes]
    sel = select_matrices(base.source, [c.source for c in ckpts], include=cfg.include, exclude=cfg.exclude,
                          embeddings=cfg.embeddings, on_mismatch=cfg.on_mismatch)
    notes += [f"{run.label}: skipped {name}: {reason}" for name, reason in sel.skipped]
    sel = _adapted_only(run.label, sel, ckpts, notes)
    source = getattr(base.source, "base", base.source)  # an adapter's base model
    cov = source.coverage(sel.matrices)
    notes.append(f"{run.label}: {cov.line()}")
    return Plan(run, base, ckpts, sel.matrices, hidden_size(base.source.config), notes, cov)


def cohorts(plans: list[Plan]) -> list[list[int]]:
    """The runs (indices) measured together, in order of first appearance: those whose bases hold the same
    matrices, bit for bit (the same files, or copies: ``same_tensors``), with the same hidden size, share the
    base's decomposition, each group's base decomposed once for all of them (SFT and RLVR from one pretrained
    model: on the 90M pair with one checkpoint, a third of a run's time)."""
    cohorts: list[list[int]] = []
    for i, plan in enumerate(plans):
        for cohort in cohorts:
            first = plans[cohort[0]]
            if (first.matrices == plan.matrices and first.hidden == plan.hidden
                    and same_tensors(first.base.source, plan.base.source, [m.tensor for m in plan.matrices])):
                cohort.append(i)
                break
        else:
            cohorts.append([i])
    return cohorts


def hidden_size(config: dict | None) -> int | None:
    """The model's hidden size from its config.json (a multimodal config keeps it in text_config)."""
    cfg = (config or {}).get("text_config") or config or {}
    h = cfg.get("hidden_size") if isinstance(cfg, dict) else None
    return h if isinstance(h, int) and h > 0 else None


def open_checkpoints(run: Run, cfg: AnalysisConfig, base: TensorSource | None = None) -> list[Checkpoint]:
    """The run's checkpoints in step order, every one with a step and a label unique in the run.

    Checkpoints whose files give no step (a base against its fine-tunes: `phi-2 phi-2-instruct`) are
    steps 1..N in the order given; a run mixing them with numbered ones has no order, and is refused.
    """
    ckpts = [c for path in run.checkpoints for c in open_run(path, allow_pickle=cfg.allow_pickle, base=base)]
    if not ckpts:
        raise GeometryError(f"run {run.label}: no checkpoints found")
    unnumbered = [c for c in ckpts if c.step is None]
    if unnumbered and len(unnumbered) < len(ckpts):
        numbered = next(c for c in ckpts if c.step is not None)
        raise GeometryError(f"run {run.label}: {numbered.source.label} is step {numbered.step}, but "
                            f"{unnumbered[0].source.label} says no step (no checkpoint-N name, no trainer_state.json); "
                            "give numbered checkpoints only, or unnumbered ones only (steps 1..N in the order given)")
    if unnumbered:
        ckpts = [c._replace(step=i) for i, c in enumerate(ckpts, start=1)]
    ckpts.sort(key=lambda c: c.step)
    steps = [c.step for c in ckpts]
    if len(set(steps)) != len(steps):
        dup = sorted(s for s, n in Counter(steps).items() if n > 1)
        raise GeometryError(f"run {run.label}: two checkpoints share step {dup[0]}")
    names = Counter(c.label for c in ckpts)  # two folders both named `final`: their paths tell them apart
    return [c if names[c.label] == 1 else c._replace(label=c.source.label) for c in ckpts]


def _adapted_only(label: str, sel, ckpts: list[Checkpoint], notes: list[str]):
    """A run of LoRA adapter checkpoints updates only the adapted weights: measure those (the others'
    updates are exactly zero)."""
    adapted = [c.source.adapted for c in ckpts if hasattr(c.source, "adapted")]
    if not adapted:
        return sel
    keep = set.intersection(*adapted)
    chosen = [s for s in sel.matrices if s.tensor in keep]
    if not chosen:
        raise GeometryError(f"run {label}: no selected matrix is adapted by its LoRA checkpoints")
    notes.append(f"{label}: LoRA adapter checkpoints: measuring the {len(chosen)} adapted matrices of "
                 f"{len(sel.matrices)} selected (W_t = W0 + scale B A, formed in float64)")
    return sel._replace(matrices=chosen)
