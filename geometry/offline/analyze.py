"""``analyze``: the one offline entry. Runs (a base and its checkpoints) in, an ``Analysis`` table out.

Streaming order: for each group of same-shape matrices, decompose the base once, then visit every
checkpoint of every run from that base (``cohorts``), reading only that group's tensors. Peak memory is
one group plus its base factors, whatever the number of checkpoints and runs.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from geometry import buffers
from geometry.errors import GeometryError
from geometry.offline import distributed as dist
from geometry.offline import memory, threads
from geometry.offline.adapters import AdapterSource
from geometry.offline.batches import batch_groups, stored_group
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import (
    BaseFactors,
    StepResult,
    decompose_base,
    group_mb,
    locking_sims,
    measure_step,
)
from geometry.offline.lens import LensDirection, lens
from geometry.offline.matrices import MatrixSpec
from geometry.offline.pairs import Cell, Pairs, Subspaces, compare_group
from geometry.offline.plans import Plan, Run, cohorts, plan_run
from geometry.offline.sources import Checkpoint, TensorSource
from geometry.plan import gpu as on_gpu_plan
from geometry.progress import bar as progress_bar
from geometry.selection import Coverage
from geometry.table import Row, Table


class Curve(NamedTuple):
    """A per-matrix vector kept for plots: principal-angle curves ("angles_u", "angles_v", degrees,
    ascending) and spectra ("spectrum": of W_t; at step 0 of W_0)."""

    run: str
    step: int
    matrix: str
    kind: str
    values: np.ndarray


class Analysis(Table):
    """The tidy table of every metric, plus what does not fit in it (returned by ``analyze`` and ``load``).

    A ``geometry.Table`` of rows (run, step, matrix, layer, module, metric, value): ``where``, ``unique``,
    ``values``, ``write_csv``, ``to_pandas``. Attributes:

    curves: per-matrix angle curves and spectra; notes: fallbacks taken and matrices skipped, in words;
    runs: the runs analysed, in order; labels: run -> step -> the name of the checkpoint measured at that
    step (step 0: the base), for the outputs; pairs: runs of one base compared with each other
    (geometry.offline.pairs, docs/metrics.md item 10); lens: with ``config.lens``, each run's final update read as
    tokens (geometry.offline.lens); rank: this process's torchrun rank (only rank 0 holds the rows and curves of a
    distributed analysis; the others' are empty and write nothing).

    Examples
    --------
    >>> from geometry import Analysis, AnalysisConfig, Row
    >>> a = Analysis([Row("sft", 10, "m", 0, "q_proj", "sparsity_bf16", 0.25)], [], [], [], AnalysisConfig())
    >>> a.where(run="sft", metric="sparsity_bf16").values()
    [0.25]
    """

    def __init__(self, rows: Iterable[Row], curves: list[Curve], notes: list[str], runs: list[Run],
                 config: AnalysisConfig, labels: dict[str, dict[int, str]] | None = None, rank: int = 0):
        super().__init__(rows)
        self.curves, self.notes, self.runs, self.config = curves, notes, runs, config
        self.labels = labels or {}
        self.rank = rank
        self.coverage: dict[str, Coverage] = {}  # run -> the share of its model measured (geometry.selection)
        self.pairs = Pairs()
        self.lens: list[LensDirection] = []
        self.work: list[tuple[int, float]] = []


def analyze(runs: Run | Sequence[Run] | str | Path, checkpoints: Sequence[str | Path] | None = None, *,
            label: str = "run", config: AnalysisConfig | None = None, progress: bool = False,
            distributed: bool = False) -> Analysis:
    """Measure every metric of docs/metrics.md for every run, checkpoint and matrix.

    Parameters
    ----------
    runs : Run, sequence of Run, or a path
        The runs to measure side by side, each with its own base; or one run's base model (a path or hub name),
        with ``checkpoints``.
    checkpoints : sequence of paths, optional
        With a base as ``runs``: its checkpoints (model dirs, weight files, or a Trainer output dir).
    label : str
        The run's name in the outputs when ``runs`` is a base.
    config : AnalysisConfig, optional
        What to measure and how (default: ``AnalysisConfig()``).
    progress : bool
        A progress bar on stderr, drawn only when it is a terminal.
    distributed : bool
        Under torchrun, every rank calls this and the groups of matrices are split across the ranks by cost
        (geometry.offline.distributed); rank 0 returns the whole table, the same as one process's. Off (the
        default), a rank of someone else's job measures everything.

    Returns
    -------
    Analysis
        The tidy table (one row per run, step, matrix and metric) with curves, notes, pairs and coverage.

    Raises
    ------
    GeometryError
        Bad input, in one line: a missing or truncated file, a shape mismatch, NaN/Inf weights, a pickle
        checkpoint without ``allow_pickle``, two runs with one label.

    Examples
    --------
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from geometry import AnalysisConfig, analyze
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    >>> save_file({"model.layers.0.mlp.up_proj.weight": w}, f"{d}/base.safetensors")
    >>> save_file({"model.layers.0.mlp.up_proj.weight": w + 0.05}, f"{d}/tuned.safetensors")
    >>> a = analyze(f"{d}/base.safetensors", [f"{d}/tuned.safetensors"], config=AnalysisConfig(quick=True))
    >>> a.unique("matrix")
    ['model.layers.0.mlp.up_proj.weight']
    >>> [round(v, 6) for v in a.where(metric="stable_rank").values()]  # D = 0.05 everywhere: rank one
    [1.0]
    """
    cfg = config or AnalysisConfig()
    if isinstance(runs, (str, Path)):
        if not checkpoints:
            raise GeometryError("analyze(base, checkpoints): no checkpoints given")
        runs = [Run(label, runs, list(checkpoints))]
    elif isinstance(runs, Run):
        runs = [runs]
    runs = list(runs)
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise GeometryError(f"run labels must be unique, got {labels}")
    memory.return_freed_memory()
    w = dist.world() if distributed else dist.World(0, 1, 0)
    rows, curves, notes, step_labels, cells = [], [], [], {}, []
    work = [(0, 0.0)] * w.size
    try:
        plans = [plan_run(run, cfg) for run in runs]  # every input opened and checked before anything is measured
        outs: dict[int, _RunOut] = {}
        for cohort in cohorts(plans):
            outs.update(zip(cohort, _analyze_cohort([plans[i] for i in cohort], cfg, progress, w, work),
                            strict=True))
    finally:
        dist.close(w)
    for i, plan in enumerate(plans):  # in run order, as one run after another would give them
        rows += outs[i].rows
        curves += outs[i].curves
        notes += plan.notes + outs[i].notes
        cells += outs[i].pairs
        step_labels[plan.run.label] = {0: plan.base.label, **{c.step: c.label for c in plan.ckpts}}
    analysis = Analysis(rows, curves, notes, runs, cfg, step_labels, rank=w.rank)
    analysis.work = work
    analysis.coverage = {plan.run.label: plan.coverage for plan in plans}
    analysis.pairs = Pairs.from_cells(cells, labels)
    for plan in plans if cfg.lens and w.rank == 0 else ():  # reads each run's unembedding: opt-in
        found, lens_notes = lens(plan.run.label, plan.base.source, plan.ckpts[-1], plan.matrices, cfg)
        analysis.lens += found
        analysis.notes += lens_notes
    return analysis


class _GroupOut(NamedTuple):
    """What one group of matrices contributes to the analysis (what a rank sends to rank 0)."""

    rows: list[Row]
    curves: list[Curve]
    methods: Counter
    sizes: tuple[int, int]  # (k, r) the group was measured with
    pairs: tuple[Cell, ...] = ()  # the runs compared with each other (on the first run's output)


class _RunOut(NamedTuple):
    """What a run contributes to the analysis (empty on a torchrun rank other than 0)."""

    rows: list[Row]
    curves: list[Curve]
    notes: list[str]  # on the measuring: sizes, fallbacks
    pairs: tuple[Cell, ...] = ()  # runs of its base compared with each other (on the first run of those)


def _analyze_cohort(plans: list[Plan], cfg: AnalysisConfig, progress: bool, w: dist.World,
                    work: list[tuple[int, float]]) -> list[_RunOut]:
    """Measure runs of one base and the same matrices (``cohorts``): each group's base decomposed once, then
    every run's checkpoints visited. Under torchrun this rank measures its share of the groups and rank 0
    collects every group's output in group order."""
    first = plans[0]
    base, hidden = first.base.source, first.hidden
    device = dist.local_device(cfg.torch_device(), w)

    def k_of(shape: tuple[int, int]) -> int:
        return cfg.principal_size(shape, hidden)

    groups = batch_groups(first.matrices, cfg.memory_mb, device, k_of)
    costs = [dist.group_cost(g[0].shape, len(g)) for g in groups]
    owner = dist.assign(costs, w.size)
    mine = [i for i, r in enumerate(owner) if r == w.rank]
    label = ", ".join(p.run.label for p in plans)
    desc = f"analyze {plans[0].run.label}" + (f" and {len(plans) - 1} more runs" if len(plans) > 1 else "")
    bar = progress_bar(len(mine) * sum(len(p.ckpts) for p in plans), desc, "ckpt-group", progress and w.rank == 0)
    runs = [(p.run.label, p.ckpts) for p in plans]
    done: dict[int, list[_GroupOut]] = {}
    error = None
    cpu = time.process_time()

    def measure(i: int) -> list[_GroupOut]:
        with buffers.reusing():  # the group's working buffers lent again within it (geometry.buffers)
            out = _measure_group(base, runs, groups[i], cfg, device, hidden, bar)
        memory.trim()
        return out

    need = {i: group_mb(groups[i][0].shape, len(groups[i]), k_of(groups[i][0].shape)) for i in mine}
    costliest = sorted(mine, key=lambda i: -costs[i])  # the longest first: the threads end together
    if not on_gpu_plan(device):
        wide = {i for i in mine if min(groups[i][0].shape) >= threads.THREADED_SIDE}
        plan = threads.phases(cfg.threads, need, cfg.memory_mb, costliest, wide)
    else:  # the GPU plan measures one group at a time, with batched kernels
        plan = [(costliest, 1, 0)]
    try:  # closed on an interrupt too: leave=False then clears its line for the message
        for items, n, kernel_threads in plan:
            with threads.kernels(kernel_threads) if kernel_threads else nullcontext():
                done.update(zip(items, threads.ordered_map(measure, items, n), strict=True))
    except Exception as e:
        if not w.distributed:
            raise
        error = str(e) if isinstance(e, GeometryError) else f"{type(e).__name__}: {e}"
    finally:
        bar.close()
    parts = dist.gather(w, (done, time.process_time() - cpu), error)
    if parts is None:  # not rank 0: its groups are with rank 0 now
        return [_RunOut([], [], []) for _ in plans]
    for r, (part, seconds) in enumerate(parts):
        work[r] = (work[r][0] + len(part) * len(plans), work[r][1] + seconds)
    merged = {i: out for part, _ in parts for i, out in part.items()}
    outs = [_finish(p.run.label, groups, [merged[i][j] for i in range(len(groups))], hidden, cfg)
            for j, p in enumerate(plans)]
    if len(plans) > 1:
        outs[0].notes.append(f"{label}: one base decomposition for these runs, whose bases hold the same matrices "
                             "bit for bit")
    return outs


def _finish(label: str, groups: list[list[MatrixSpec]], outs: list[_GroupOut], hidden: int | None,
            cfg: AnalysisConfig) -> _RunOut:
    """One run's rows and curves in group order, and its notes on the sizes used and the fallbacks taken."""
    rows, curves, notes, cells = [], [], [], []
    methods: Counter = Counter()
    sizes: dict[tuple[int, int], list] = defaultdict(list)  # (k, r) -> shapes measured with them
    for group, out in zip(groups, outs, strict=True):
        rows += out.rows
        curves += out.curves
        cells += out.pairs
        methods.update(out.methods)
        sizes[out.sizes].append(group[0].shape)
    where = f"hidden size {hidden}" if hidden else "no hidden_size in config.json: scaled to each matrix's smaller side"
    if cfg.quick:
        notes.append(f"{label}: quick suite: the update alone (sparsity, concentration, norms, rank, "
                     "locking); W0 and W_t not decomposed: no angles, NSS, overlaps, masks, intruders or interval "
                     "metrics")
        sizes.clear()
    for (k, r), shapes in sorted(sizes.items()):
        notes.append(f"{label}: principal k = {k}, mask rank r = {r} for shapes "
                     f"{', '.join(f'{m}x{n}' for m, n in sorted(set(shapes)))} ({where})")
    for method, count in sorted(methods.items()):
        if "->" in method:
            notes.append(f"{label}: {count} batch decompositions fell back {method} (fast path failed its check)")
    return _RunOut(rows, curves, notes, tuple(cells))


def _measure_group(base: TensorSource, runs: list[tuple[str, list[Checkpoint]]], group: list[MatrixSpec],
                   cfg: AnalysisConfig, device: torch.device, hidden: int | None, bar) -> list[_GroupOut]:
    """One group of matrices: its base decomposed once, then each run's (label, checkpoints) visited; two runs or
    more are then compared with each other (``compare_group``), from the update subspaces kept for it."""
    factors = decompose_base(stored_group(base, group, device), cfg, hidden)
    outs = []
    kept: dict[str, dict[int, Subspaces]] = {}  # run -> step -> its update's top-K subspaces (O((m + n) K) each)
    for label, ckpts in runs:
        rows: list[Row] = []
        curves: list[Curve] = []
        for i, spec in enumerate(group):
            if factors.svd is not None:  # None: the quick suite, W0 not decomposed
                curves.append(Curve(label, 0, spec.name, "spectrum", factors.svd.S[i].cpu().numpy()))
        results = _visit_checkpoints(factors, ckpts, group, cfg, device, bar)
        if len(runs) > 1:
            kept[label] = {c.step: Subspaces(res.UK, res.VK, res.values["fro_norm"] > 0)
                           for c, res in zip(ckpts, results, strict=True)}
        _emit(label, [c.step for c in ckpts], group, results, rows, curves)
        outs.append(_GroupOut(rows, curves, Counter(m for res in results for m in res.methods),
                              (factors.k, factors.r)))
        del results  # freed before the next run's checkpoints are visited, not after
    if len(runs) > 1:
        cells = compare_group(factors.W0, runs, kept, group, lambda source: stored_group(source, group, device),
                              held_bytes=group_mb(group[0].shape, len(group), factors.k) * 2**20)  # the group's share
        outs[0] = outs[0]._replace(pairs=tuple(cells))
    return outs


def _update_factors(source, group: list[MatrixSpec], device: torch.device):
    """The group's updates as stacked factors (L (G, m, r), R (G, r, n)) when the checkpoint is a LoRA adapter
    holding every matrix of the group whole at one rank; None otherwise (the update is then decomposed)."""
    if not isinstance(source, AdapterSource) or any(s.rows is not None or s.tensor not in source.adapted
                                                    for s in group):
        return None
    pairs = [source.update(s.tensor) for s in group]
    if len({L.shape[-1] for L, _ in pairs}) != 1:
        return None
    return torch.stack([L for L, _ in pairs]).to(device), torch.stack([R for _, R in pairs]).to(device)


def _visit_checkpoints(factors: BaseFactors, ckpts: list[Checkpoint], group: list[MatrixSpec], cfg: AnalysisConfig,
                       device: torch.device, bar) -> list[StepResult]:
    results, prev = [], factors.W0
    for ckpt in ckpts:
        Wt = stored_group(ckpt.source, group, device)  # as stored: widened a block at a time where measured
        m, n = factors.W0.shape[-2:]
        warm = None if not results else (results[-1].VK if m >= n else results[-1].UK)
        results.append(measure_step(factors, Wt, prev, cfg, warm, _update_factors(ckpt.source, group, device)))
        memory.trim()  # what this checkpoint freed goes back, so that the heap does not grow with the checkpoints
        prev = Wt if not cfg.quick else factors.W0
        del Wt
        bar.update(1)
    return results


def _emit(label: str, steps: list[int], group: list[MatrixSpec], results: list[StepResult], rows: list[Row],
          curves: list[Curve]) -> None:
    for step, res, sims in zip(steps, results, locking_sims(results), strict=True):
        values = {**res.values, **sims}
        cols = {name: v.cpu().double().numpy() for name, v in values.items()}
        for i, spec in enumerate(group):
            for name, col in cols.items():
                rows.append(Row(label, step, spec.name, spec.layer, spec.module, name, float(col[i])))
            for kind, tensor in (("angles_u", res.angles_u), ("angles_v", res.angles_v), ("spectrum", res.spectrum)):
                if tensor is not None:
                    curves.append(Curve(label, step, spec.name, kind, tensor[i].cpu().numpy()))


def curves_by(analysis: Analysis, kind: str) -> dict[tuple[str, int, str], np.ndarray]:
    """The curves of one kind keyed by (run, step, matrix)."""
    return {(c.run, c.step, c.matrix): c.values for c in analysis.curves if c.kind == kind}
