"""Runs compared with each other (docs/metrics.md item 10): runs of one base, matrix by matrix, step by step.

For runs a and b with updates D_a, D_b and changed masks M_a, M_b (item 1) over N entries:
``pair_mask_jaccard`` |M_a ∩ M_b| / |M_a ∪ M_b|; ``pair_mask_overlap_ratio`` |M_a ∩ M_b| / (|M_a| |M_b| / N), 1 for
independent masks of those densities; ``pair_update_cosine`` <D_a, D_b>_F / (||D_a||_F ||D_b||_F);
``pair_sign_agreement`` the share of M_a ∩ M_b where sign(D_a) = sign(D_b) (0.5 by chance); ``pair_sim_u``,
``pair_sim_v`` Sim_K (item 7) between the runs' top-K left (right) update subspaces.

The analysis (geometry.offline.analyze) measures the runs of one base together, a group of matrices at a time;
once every run's checkpoints of a group are measured, each pair of runs is compared at every step both have
and at their final steps (``visits``). The checkpoints of a step are read together (as many as the group's
memory share holds) and visited a band of rows at a time: each update's band and changed entries are formed
once, and every pair's intersections, sign agreements and inner products are their Gram matrices
(``pair_grams``), no mask ever whole. The subspaces are those the engine keeps for locking.
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
from geometry.kernels import long_band, mm, row_bands
from geometry.offline.matrices import MatrixSpec
from geometry.offline.sources import Checkpoint
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


class Grams(NamedTuple):
    """``Counts`` of every pair of R updates of a group at once: (L, R, R) float64, the diagonal each update with
    itself (|M_i|, ||D_i||_F^2)."""

    entries: torch.Tensor  # (L,) N
    both: torch.Tensor  # |M_i ∩ M_j|
    agree: torch.Tensor  # entries of M_i ∩ M_j where sign(D_i) = sign(D_j)
    dot: torch.Tensor  # <D_i, D_j>_F

    def pair(self, i: int, j: int) -> Counts:
        """Updates i and j, (L,)."""
        return Counts(self.entries, self.both[:, i, i], self.both[:, j, j], self.both[:, i, j], self.agree[:, i, j],
                      self.dot[:, i, j], self.dot[:, i, i], self.dot[:, j, j])


EXACT_FLOAT32 = 1 << 24  # 0/1 products summed in float32 are exact up to this many entries


def pair_grams(W0, Ws: Sequence) -> Grams:
    """``Grams`` of the updates W - W0 for each W of ``Ws``, all (L, m, n) tensors or matrices left in their files
    (offline.stored), visited a band of their long side at a time: a band of one matrix of every update, as
    float64 values and as 0/1 indicators of its changed entries (those moved up, down, or to the other zero), and
    every pair's counts are their Gram matrices (BLAS): memory is R bands, never a mask whole."""
    m, n = W0.shape[-2:]
    L, rows, cols, R = W0.shape[0], max(m, n), min(m, n), len(Ws)
    both, agree, dot = (torch.zeros(L, R, R, dtype=torch.float64) for _ in range(3))
    with spare() as s0, spare() as sd, spare() as si:
        for part in row_bands(rows, (8 * L + 24 * R) * cols):  # W0's band, and D and ind for one matrix
            w0, bands = long_band(W0, part), [long_band(W, part) for W in Ws]  # each valid until its next band
            base, bits = s0.widen(w0), M.bf16_bits(w0)  # (L, b, r)
            size = (part.stop - part.start) * cols
            kind = torch.float32 if size < EXACT_FLOAT32 else torch.float64
            for k in range(L):
                D = sd.take((R, size), device=base.device)  # one matrix's band of every update
                ind = si.take((4, R, size), kind, base.device)  # changed; up, down, to the other zero (+0 <-> -0)
                for i, w in enumerate(bands):
                    d = D[i].view(base.shape[1:])
                    d.copy_(w[k])
                    d -= base[k]
                    changed = (bits[k] != M.bf16_bits(w[k])).reshape(-1)  # in D's (logical) order
                    ind[0, i] = changed
                    ind[1, i], ind[2, i], ind[3, i] = changed & (D[i] > 0), changed & (D[i] < 0), changed & (D[i] == 0)
                dot[k] += mm(D, D.mT).cpu()
                both[k] += mm(ind[0], ind[0].mT).double().cpu()
                for x in ind[1:]:  # equal signs: both up, both down, or both to the other zero
                    if x.any():
                        agree[k] += mm(x, x.mT).double().cpu()
    return Grams(torch.full((L,), float(m * n), dtype=torch.float64), both, agree, dot)


def pair_counts(W0, Wa, Wb) -> Counts:
    """``Counts`` of one pair of updates, (L,) (``pair_grams`` of the two)."""
    return pair_grams(W0, [Wa, Wb]).pair(0, 1)


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
    where these differ; ordered by step, then pair."""
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
    counts: Counts  # of this matrix, floats: what run-level values pool
    values: dict[str, float]  # PAIR_METRICS


def compare_group(W0, runs: Sequence[tuple[str, Sequence[Checkpoint]]], subspaces: dict[str, dict[int, Subspaces]],
                  group: Sequence[MatrixSpec], read: Callable[[object], object],
                  held_bytes: float = math.inf) -> list[Cell]:
    """Every pair of ``runs`` (label, checkpoints) on one group of matrices; W0 the group's base, ``read(source)``
    a checkpoint's group as the analysis reads it, ``subspaces``: run -> step -> its update's top-K subspaces.
    At each step the checkpoints visited are read together (``pair_grams``), as many at once as
    ``held_bytes`` holds (each counted whole, as float32), and at least two."""
    ckpts = {label: {c.step: c for c in cs} for label, cs in runs}
    per_read = 4 * math.prod(W0.shape)
    cells: list[Cell] = []
    for todo in _rounds(visits({label: [c.step for c in cs] for label, cs in runs})):
        entries = list(dict.fromkeys(e for v in todo for e in ((v.a, v.step_a), (v.b, v.step_b))))
        # all at once where they fit, else in chunks read two at a time
        size = len(entries) if len(entries) * per_read <= held_bytes else max(1, int(held_bytes // per_read) // 2)
        chunk = {e: i // size for i, e in enumerate(entries)}
        for pair in sorted({tuple(sorted((chunk[v.a, v.step_a], chunk[v.b, v.step_b]))) for v in todo}):
            read_now = [e for e in entries if chunk[e] in pair]
            grams = pair_grams(W0, [read(ckpts[r][s].source) for r, s in read_now])
            index = {e: i for i, e in enumerate(read_now)}
            for v in todo:
                if tuple(sorted((chunk[v.a, v.step_a], chunk[v.b, v.step_b]))) != pair:
                    continue
                counts = grams.pair(index[v.a, v.step_a], index[v.b, v.step_b])
                sims = pair_sims(subspaces[v.a][v.step_a], subspaces[v.b][v.step_b])
                values = {**counts.values(), "pair_sim_u": sims[0], "pair_sim_v": sims[1]}  # name -> (L,)
                columns = {name: x.tolist() for name, x in values.items()}
                per_matrix = torch.stack(counts, 1).tolist()  # (L, 8)
                cells += [Cell(v, spec.name, spec.layer, spec.module, Counts(*per_matrix[i]),
                               {name: columns[name][i] for name in PAIR_METRICS}) for i, spec in enumerate(group)]
    return cells


def _rounds(todo: list[Visit]) -> list[list[Visit]]:
    """Visits of one step together (those of the final steps, ``step`` None, together)."""
    out: dict[int | None, list[Visit]] = {}
    for v in todo:
        out.setdefault(v.step, []).append(v)
    return list(out.values())


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
        pooled = Counts(*torch.tensor([c.counts for c in same], dtype=torch.float64).sum(0))
        for name, value in pooled.values().items():
            per_step[name].append(float(value))
        for name, of in (("pair_update_cosine_mean", "pair_update_cosine"), ("pair_sim_u", "pair_sim_u"),
                         ("pair_sim_v", "pair_sim_v")):
            finite = [c.values[of] for c in same if math.isfinite(c.values[of])]
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
        rows = [PairRow(c.visit.a, c.visit.b, c.visit.step, c.matrix, c.layer, c.module, name, c.values[name])
                for c in cells for name in PAIR_METRICS]
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
