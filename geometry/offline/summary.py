"""Run-level summaries: per-matrix rows aggregated per step as SPEC.md says, and locking onset."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import NamedTuple

from geometry.concentration import ABS_TOLS, REL_TOLS
from geometry.locking import locking_onset, median_onset
from geometry.table import Row, Table

# SPEC 1 and 11: sparsity, at every tolerance, is parameter-count-weighted. SPEC 5: a mask overlap is pooled over
# the update masks, |M* ∩ M| / |M| summed over matrices, i.e. weighted by each matrix's changed-entry count.
WEIGHTED_BY_PARAMS = ("sparsity_bf16", "sparsity_abs", *(f"sparsity_abs_{t}" for t in ABS_TOLS),
                      *(f"sparsity_rel_{t}" for t in REL_TOLS))
WEIGHTED_BY_CHANGED = ("mask_overlap_principal", "mask_overlap_lowmag", "mask_overlap_principal_ratio",
                       "mask_overlap_lowmag_ratio")
ONSET_METRIC = "sim_final_v"  # onset follows the right subspace, the one gradient projection (SPEC 9) uses
# SPEC 7: the paper's trajectories cover the attention matrices; reports give that view beside all matrices
ATTENTION_MODULES = frozenset(
    "q_proj k_proj v_proj o_proj qkv_proj query_key_value c_attn out_proj wq wk wv wo".split())


class RunSummary(NamedTuple):
    """One run, aggregated over its matrices."""

    run: str
    steps: list[int]  # measured steps, ascending
    matrices: int  # matrices measured
    per_step: dict[str, list[float]]  # metric -> run-level value at each step
    onsets: dict[str, int | None]  # matrix -> locking onset step (None: never locks)
    locking_onset_step: int | None  # median over matrices; None: the run never locks
    locking_onset_frac: float | None  # onset step / final step
    attention: list[str]  # the attention matrices (ATTENTION_MODULES) among those measured
    attention_onset_step: int | None  # median over the attention matrices only (None: none, or never locks)
    attention_onset_frac: float | None

    def final(self, metric: str) -> float:
        """Run-level value at the final step; NaN for a metric the table does not hold."""
        return self.per_step.get(metric, [math.nan])[-1]

    def to_json(self) -> dict:
        def clean(v: float):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "steps": self.steps,
            "matrices": self.matrices,
            "final": {m: clean(v[-1]) for m, v in self.per_step.items()},
            "per_step": {m: [clean(x) for x in v] for m, v in self.per_step.items()},
            "locking_onset_step": "none" if self.locking_onset_step is None else self.locking_onset_step,
            "locking_onset_frac": "none" if self.locking_onset_frac is None else self.locking_onset_frac,
            "locking_onset_attention": {
                "matrices": len(self.attention),
                "step": "none" if self.attention_onset_step is None else self.attention_onset_step,
                "frac": "none" if self.attention_onset_frac is None else self.attention_onset_frac,
            },
        }


def summarize(table: Table, tau: float = 0.9) -> list[RunSummary]:
    """A RunSummary per run of the table, in the table's run order."""
    return [_summarize_run(table.where(run=run), run, tau) for run in table.unique("run")]


DERIVED = ("locking_onset_step", "locking_onset_frac")  # per-matrix rows onset_rows derives from the others


def onset_rows(table: Table, tau: float = 0.9) -> Table:
    """Per-matrix ``locking_onset_step`` / ``locking_onset_frac`` rows at the final step (NaN: never locks)."""
    rows = []
    for summary in summarize(table, tau):
        final = summary.steps[-1]
        first = {r.matrix: r for r in table.where(run=summary.run, step=final, metric=ONSET_METRIC)}
        for matrix, onset in summary.onsets.items():
            r = first[matrix]
            step = math.nan if onset is None else float(onset)
            rows.append(Row(summary.run, final, matrix, r.layer, r.module, "locking_onset_step", step))
            frac = _frac(onset, final)
            rows.append(Row(summary.run, final, matrix, r.layer, r.module, "locking_onset_frac",
                            math.nan if frac is None else frac))
    return Table(rows)


def _summarize_run(table: Table, run: str, tau: float) -> RunSummary:
    steps = sorted(table.unique("step"))
    by = defaultdict(dict)  # (step, matrix) -> metric -> value
    modules = {}
    for r in table:
        by[(r.step, r.matrix)][r.metric] = r.value
        modules[r.matrix] = r.module
    matrices = sorted({m for _, m in by})
    metrics = [m for m in table.unique("metric") if m != "n_params"]
    per_step = {m: [_aggregate(m, [by[(s, x)] for x in matrices if (s, x) in by]) for s in steps] for m in metrics}
    onsets = {}
    for x in matrices:
        traj = [(s, by[(s, x)].get(ONSET_METRIC, math.nan)) for s in steps if (s, x) in by]
        onsets[x] = locking_onset([s for s, _ in traj], [v for _, v in traj], tau)
    attention = [x for x in matrices if modules.get(x) in ATTENTION_MODULES]
    onset = median_onset(list(onsets.values()))
    att_onset = median_onset([onsets[x] for x in attention])
    return RunSummary(run, steps, len(matrices), per_step, onsets, onset, _frac(onset, steps[-1]), attention,
                      att_onset, _frac(att_onset, steps[-1]))


def _frac(onset: int | None, final: int) -> float | None:
    return None if onset is None or final <= 0 else onset / final


def _aggregate(metric: str, cells: list[dict[str, float]]) -> float:
    pairs = []
    for c in cells:
        v = c.get(metric, math.nan)
        if not math.isfinite(v):
            continue
        if metric in WEIGHTED_BY_PARAMS:
            w = c["n_params"]
        elif metric in WEIGHTED_BY_CHANGED:
            w = c["n_params"] * (1.0 - c["sparsity_bf16"])
        else:
            w = 1.0
        pairs.append((v, w))
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan


def summary_json(summaries: list[RunSummary], notes: list[str], config: dict | None = None) -> str:
    """summary.json: run-level values, notes, and the analysis settings (every size, seed and method used)."""
    doc = {"runs": {s.run: s.to_json() for s in summaries}, "notes": notes}
    if config is not None:
        doc["config"] = config
    return json.dumps(doc, indent=2)
