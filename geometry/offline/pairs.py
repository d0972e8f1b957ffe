"""Runs compared with each other (docs/metrics.md item 10): runs of one base, matrix by matrix, step by step.

For runs a and b with updates D_a, D_b and changed masks M_a, M_b (item 1) over N entries:
``pair_mask_jaccard`` |M_a ∩ M_b| / |M_a ∪ M_b|; ``pair_mask_overlap_ratio`` |M_a ∩ M_b| / (|M_a| |M_b| / N), 1 for
independent masks of those densities; ``pair_update_cosine`` <D_a, D_b>_F / (||D_a||_F ||D_b||_F);
``pair_sign_agreement`` the share of M_a ∩ M_b where sign(D_a) = sign(D_b) (0.5 by chance); ``pair_sim_u``,
``pair_sim_v`` Sim_K (item 7) between the runs' top-K left (right) update subspaces.

The analysis (geometry.offline.analyze) measures the runs of one base together, a group of matrices at a time;
once every run's checkpoints of a group are measured, each pair of runs is compared at every step both have
and at their final steps (``visits``). Masks, signs and inner products come from W0, W_a and W_b a band of
rows at a time, no mask ever whole (``pair_counts``); the subspaces are those the engine keeps for locking.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from geometry import metrics as M
from geometry.buffers import spare
from geometry.kernels import long_band, row_bands
from geometry.offline.sources import Checkpoint, MatrixSpec
from geometry.subspaces import subspace_sim

PAIR_METRICS = ("pair_mask_jaccard", "pair_mask_overlap_ratio", "pair_update_cosine", "pair_sign_agreement",
                "pair_sim_u", "pair_sim_v")
# run level only: the per-matrix cosines' mean, beside the global one (all matrices as one vector)
RUN_METRICS = (*PAIR_METRICS, "pair_update_cosine_mean")
COLUMNS = ("run_a", "run_b", "step", "matrix", "layer", "module", "metric", "value")


class Counts(NamedTuple):
    """What a pair of updates shares on some matrices, float64 (L,) or scalars: sums over matrices pool them."""

    entries: torch.Tensor  # N
    changed_a: torch.Tensor  # |M_a|
    changed_b: torch.Tensor  # |M_b|
    both: torch.Tensor  # |M_a ∩ M_b|
    agree: torch.Tensor  # entries of M_a ∩ M_b where sign(D_a) = sign(D_b)
    dot: torch.Tensor  # <D_a, D_b>_F
    energy_a: torch.Tensor  # ||D_a||_F^2
    energy_b: torch.Tensor  # ||D_b||_F^2

    def values(self) -> dict[str, torch.Tensor]:
        """The four mask and cosine metrics of item 10; NaN where a denominator is 0 (no changed entry, a
        zero update)."""
        c = self
        return {"pair_mask_jaccard": c.both / (c.changed_a + c.changed_b - c.both),
                "pair_mask_overlap_ratio": c.both * c.entries / (c.changed_a * c.changed_b),
                "pair_update_cosine": c.dot / (c.energy_a.sqrt() * c.energy_b.sqrt()),
                "pair_sign_agreement": c.agree / c.both}


def pair_counts(W0, Wa, Wb) -> Counts:
    """``Counts`` of each matrix of a group, (L, m, n) tensors or matrices left in their files (offline.stored),
    visited a band of their long side at a time: each band's masks and float64 updates are formed and dropped,
    so memory is a few bands whatever the matrices' size."""
    m, n = W0.shape[-2:]
    L, rows, cols = W0.shape[0], max(m, n), min(m, n)
    sums = torch.zeros(7, L, dtype=torch.float64)  # changed_a, changed_b, both, agree, dot, energy_a, energy_b
    with spare() as s0, spare() as sa, spare() as sb:
        for part in row_bands(rows, 8 * cols * max(1, L)):
            w0, wa, wb = (long_band(W, part) for W in (W0, Wa, Wb))
            ma, mb = M.changed_mask(w0, wa), M.changed_mask(w0, wb)
            both = ma & mb
            base = s0.widen(w0)
            da, db = sa.widen(wa), sb.widen(wb)
            da -= base
            db -= base
            agree = both & (da.sign() == db.sign())
            sums += torch.stack([M.count(ma), M.count(mb), M.count(both), M.count(agree),
                                 (da * db).sum((-2, -1)).cpu(), da.square().sum((-2, -1)).cpu(),
                                 db.square().sum((-2, -1)).cpu()])
    return Counts(torch.full((L,), float(m * n), dtype=torch.float64), *sums)


class Subspaces(NamedTuple):
    """A run's top-K update subspaces at one step, as the engine keeps them for locking (StepResult)."""

    U: torch.Tensor  # (L, m, K)
    V: torch.Tensor  # (L, n, K)
    moved: torch.Tensor  # (L,) bool: D_t nonzero (a zero update has no subspace)


def pair_sims(a: Subspaces, b: Subspaces) -> tuple[torch.Tensor, torch.Tensor]:
    """Sim_K (item 7) of the left and the right subspaces, (L,) float64; NaN where either update is zero."""
    both = (a.moved & b.moved).cpu()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return (torch.where(both, subspace_sim(a.U, b.U).cpu(), nan),
            torch.where(both, subspace_sim(a.V, b.V).cpu(), nan))


class Visit(NamedTuple):
    """Two runs compared at one step each: the same ``step``, or their final steps (``step`` None) when those
    differ."""

    a: str
    b: str
    step: int | None
    step_a: int
    step_b: int


def visits(steps: dict[str, Sequence[int]]) -> list[Visit]:
    """Every pair of runs (in the order given) at each step both have, ascending, then at their final steps
    where these differ; ordered by step, then pair (a run's checkpoint is read once for all its pairs)."""
    runs = list(steps)
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    out = [Visit(a, b, s, s, s) for a, b in pairs for s in sorted(set(steps[a]) & set(steps[b]))]
    out += [Visit(a, b, None, steps[a][-1], steps[b][-1]) for a, b in pairs if steps[a][-1] != steps[b][-1]]
    return sorted(out, key=lambda v: (math.inf if v.step is None else v.step))


class Cell(NamedTuple):
    """One matrix of one visit: what the rows and the run-level values are made of."""

    visit: Visit
    matrix: str
    layer: int | None
    module: str
    counts: Counts  # of this matrix, float64 scalars
    sim_u: float
    sim_v: float


def compare_group(W0, runs: Sequence[tuple[str, Sequence[Checkpoint]]], subspaces: dict[str, dict[int, Subspaces]],
                  group: Sequence[MatrixSpec], read: Callable[[object], object]) -> list[Cell]:
    """Every pair of ``runs`` (label, checkpoints) on one group of matrices; W0 the group's base, ``read(source)``
    a checkpoint's group as the analysis reads it, two checkpoints at a time; ``subspaces``: run -> step -> its
    update's top-K subspaces."""
    ckpts = {label: {c.step: c for c in cs} for label, cs in runs}
    cells: list[Cell] = []
    held: tuple[tuple[str, int], object] | None = None  # run a's checkpoint, kept for its next pairs
    for v in visits({label: [c.step for c in cs] for label, cs in runs}):
        if held is None or held[0] != (v.a, v.step_a):
            held = None  # the previous one goes first
            held = (v.a, v.step_a), read(ckpts[v.a][v.step_a].source)
        counts = pair_counts(W0, held[1], read(ckpts[v.b][v.step_b].source))
        sim_u, sim_v = pair_sims(subspaces[v.a][v.step_a], subspaces[v.b][v.step_b])
        for i, spec in enumerate(group):
            cells.append(Cell(v, spec.name, spec.layer, spec.module, Counts(*(c[i] for c in counts)),
                              float(sim_u[i]), float(sim_v[i])))
    return cells


class PairRow(NamedTuple):
    """A row of pairs.csv: one metric of one matrix for two runs at one step (None: each run's final step,
    when those differ)."""

    run_a: str
    run_b: str
    step: int | None
    matrix: str
    layer: int | None
    module: str
    metric: str
    value: float


class PairSummary(NamedTuple):
    """Two runs aggregated over matrices at each visit: masks pooled over entries (sums of ``Counts``), cosine
    global and as the mean over matrices (``pair_update_cosine_mean``), Sim_K the mean over matrices."""

    run_a: str
    run_b: str
    steps: list[int | None]  # the visits' steps; None: each run's final step (``final_steps``)
    final_steps: tuple[int, int]  # run a's and run b's last measured steps, the last visit
    per_step: dict[str, list[float]]  # RUN_METRICS -> value at each visit

    def final(self, metric: str) -> float:
        return self.per_step.get(metric, [math.nan])[-1]

    def to_json(self) -> dict:
        def clean(v: float):
            return None if not math.isfinite(v) else v

        return {"run_a": self.run_a, "run_b": self.run_b, "steps": self.steps, "final_steps": list(self.final_steps),
                "final": {m: clean(v[-1]) for m, v in self.per_step.items()},
                "per_step": {m: [clean(x) for x in v] for m, v in self.per_step.items()}}

    @classmethod
    def from_json(cls, d: dict) -> PairSummary:
        return cls(d["run_a"], d["run_b"], d["steps"], tuple(d["final_steps"]),
                   {m: [math.nan if x is None else x for x in v] for m, v in d["per_step"].items()})


def _summary(cells: list[Cell]) -> PairSummary:
    """One pair's cells (visits in order) aggregated over matrices."""
    first = cells[0].visit
    by: dict[Visit, list[Cell]] = {}
    for c in cells:
        by.setdefault(c.visit, []).append(c)
    per_step: dict[str, list[float]] = {m: [] for m in RUN_METRICS}
    for same in by.values():
        pooled = Counts(*(torch.stack(x).sum() for x in zip(*(c.counts for c in same), strict=True)))
        for name, value in pooled.values().items():
            per_step[name].append(float(value))
        cosines = [float(c.counts.values()["pair_update_cosine"]) for c in same]
        for name, values in (("pair_update_cosine_mean", cosines), ("pair_sim_u", [c.sim_u for c in same]),
                             ("pair_sim_v", [c.sim_v for c in same])):
            finite = [x for x in values if math.isfinite(x)]
            per_step[name].append(float(np.mean(finite)) if finite else math.nan)
    last = list(by)[-1]
    return PairSummary(first.a, first.b, [v.step for v in by], (last.step_a, last.step_b), per_step)


class Pairs:
    """The runs compared with each other: pairs.csv's rows and each pair's run-level values. Empty where no two
    runs share a base."""

    def __init__(self, rows: Sequence[PairRow] = (), summaries: Sequence[PairSummary] = ()):
        self.rows, self.summaries = list(rows), list(summaries)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_cells(cls, cells: Sequence[Cell], runs: Sequence[str]) -> Pairs:
        """Rows ordered by pair (in run order), step (the final visit last), then as measured (group by group)."""
        order = {r: i for i, r in enumerate(runs)}
        cells = sorted(cells, key=lambda c: (order[c.visit.a], order[c.visit.b],
                                             math.inf if c.visit.step is None else c.visit.step))
        rows = [PairRow(c.visit.a, c.visit.b, c.visit.step, c.matrix, c.layer, c.module, name, float(value))
                for c in cells for name, value in (*c.counts.values().items(), ("pair_sim_u", c.sim_u),
                                                   ("pair_sim_v", c.sim_v))]
        by_pair: dict[tuple[str, str], list[Cell]] = {}
        for c in cells:
            by_pair.setdefault((c.visit.a, c.visit.b), []).append(c)
        return cls(rows, [_summary(same) for same in by_pair.values()])

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        for r in self.rows:
            w.writerow([r.run_a, r.run_b, "" if r.step is None else r.step, r.matrix,
                        "" if r.layer is None else r.layer, r.module, r.metric, repr(float(r.value))])
        return buf.getvalue()

    @staticmethod
    def rows_from_csv(text: str) -> list[PairRow]:
        return [PairRow(d["run_a"], d["run_b"], int(d["step"]) if d["step"] else None, d["matrix"],
                        int(d["layer"]) if d["layer"] else None, d["module"], d["metric"], float(d["value"]))
                for d in csv.DictReader(io.StringIO(text))]

    def grid(self, metric: str) -> tuple[list[str], np.ndarray]:
        """Runs and a symmetric run x run grid of ``metric`` at each pair's final visit (NaN: not compared)."""
        runs = list(dict.fromkeys(r for s in self.summaries for r in (s.run_a, s.run_b)))
        grid = np.full((len(runs), len(runs)), np.nan)
        for s in self.summaries:
            i, j = runs.index(s.run_a), runs.index(s.run_b)
            grid[i, j] = grid[j, i] = s.final(metric)
        return runs, grid

    def markdown(self) -> str:
        """summary.md's section on the runs compared with each other ('' when none are): each pair at its final
        visit."""
        from geometry.offline.markdown import fmt, table  # here: markdown's readers need no pairs

        if not self.summaries:
            return ""

        def steps(s: PairSummary) -> str:
            a, b = s.final_steps
            return str(a) if a == b else f"{a} / {b}"

        rows = [[s.run_a, s.run_b, steps(s), *(fmt(s.final(m)) for _, m in _HEADERS)] for s in self.summaries]
        return "\n".join([
            "## Runs compared with each other", "",
            "Runs of one base, at their final steps (docs/metrics.md item 10): changed entries (bf16) shared, pooled "
            "over all measured entries, their ratio to independent masks of the same densities (1: no more than "
            "chance), the share of shared entries moved the same way (0.5: chance), the updates' cosine (all "
            "matrices as one vector, and the mean over matrices) and Sim_K of their top-K update subspaces (mean "
            "over matrices). Per matrix and step: pairs.csv.", "",
            table(["run a", "run b", "final steps", *(h for h, _ in _HEADERS)], rows), ""])


_HEADERS = [("Jaccard of changed masks", "pair_mask_jaccard"), ("/ independent", "pair_mask_overlap_ratio"),
            ("sign agreement", "pair_sign_agreement"), ("cosine (global)", "pair_update_cosine"),
            ("cosine (mean)", "pair_update_cosine_mean"), ("Sim_K U", "pair_sim_u"), ("Sim_K V", "pair_sim_v")]
