"""A store's per-step tracking read back as locking curves: one Row per (step, matrix, metric)."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import torch

from geometry.capture.store import check_store, iter_tracking, read_tracking
from geometry.capture.tracking import Estimate
from geometry.locking import step_sims
from geometry.selection import layer_of, module_of
from geometry.table import Row, Table

TRACK_METRICS = ("track_sim_final_u", "track_sim_final_v", "track_sim_prev_u", "track_sim_prev_v",
                 "track_stable_rank", "track_fro_norm", "track_s1")
# What a run reports while it trains (run_values): the metrics that need no final step.
LIVE_METRICS = ("track_fro_norm", "track_stable_rank", "track_sim_prev_u", "track_sim_prev_v")


def tracking_table(run_dir: str | Path, run: str | None = None, lock_k: int | None = None,
                   steps: Collection[int] | None = None) -> Table:
    """Per-step locking curves from a store's tracking state (metric names: TRACK_METRICS).

    Per matrix and tracked step t: Sim_K of the tracked top-K subspaces (U and V) to those of the
    final tracked step T and of the previous tracked step (geometry.locking.step_sims: NaN for the
    first, and where either update is zero), stable rank ||D_t||_F^2 / s_1^2, ||D_t||_F and s_1.
    ``lock_k``: K, the leading columns of the tracked subspaces compared (default: all the recorder kept).
    ``steps``: rows only for these tracked steps (default: all); every step is still read, so "previous" stays
    the previous tracked step.
    Matrices of one shape are compared together, batched. The store is checked first
    (geometry.capture.store.check_store): a damaged one is refused, not half-read.
    """
    man = check_store(run_dir)
    tracked = man.tracking_steps
    label = run if run is not None else Path(run_dir).name
    if not tracked:
        return Table()
    keep = set(tracked if steps is None else steps)
    final = read_tracking(run_dir, tracked[-1], man.chunk_of(tracked[-1]))
    names = sorted(final)
    shape = {n: (tuple(final[n].u.shape), tuple(final[n].v.shape)) for n in names}
    groups = [[n for n in names if shape[n] == sh] for sh in dict.fromkeys(shape.values())]
    fin = [_stack(final, g, lock_k) for g in groups]
    rows: list[Row] = []
    prev = None
    for step, cur in iter_tracking(run_dir, man):
        now = [_stack(cur, g, lock_k) for g in groups]
        if step not in keep:
            prev = now
            continue
        for group, (u, v, fro, s1), (fu, fv, ffro, _), before in zip(groups, now, fin, prev or [None] * len(groups),
                                                                    strict=True):
            pu, pv, pfro = (None, None, None) if before is None else before[:3]
            su = step_sims(u, fu, pu, fro > 0, ffro > 0, None if pfro is None else pfro > 0)
            sv = step_sims(v, fv, pv, fro > 0, ffro > 0, None if pfro is None else pfro > 0)
            values = {"track_sim_final_u": su.final, "track_sim_final_v": sv.final, "track_sim_prev_u": su.prev,
                      "track_sim_prev_v": sv.prev,
                      "track_stable_rank": torch.where(s1 > 0, fro**2 / s1.clamp(min=1e-300) ** 2, math.nan),
                      "track_fro_norm": fro, "track_s1": s1}
            cols = {m: x.tolist() for m, x in values.items()}
            for i, n in enumerate(group):
                rows.extend(Row(label, step, n, layer_of(n), module_of(n), m, col[i]) for m, col in cols.items())
        prev = now
    return Table(rows)


def _stack(est: dict[str, Estimate], group: list[str], k: int | None):
    """One shape's Estimates stacked: U_K (B, m, k), V_K (B, n, k), ||D||_F (B,), s_1 (B,)."""
    u = torch.stack([est[n].u[:, :k] for n in group])
    v = torch.stack([est[n].v[:, :k] for n in group])
    fro = torch.tensor([est[n].fro for n in group], dtype=torch.float64)
    s1 = torch.stack([est[n].s[0] for n in group]).double()
    return u, v, fro, s1


def step_values(est: Estimate, final: Estimate, prev: Estimate | None) -> dict[str, float]:
    """TRACK_METRICS of one matrix at one step, from its Estimates at this, the final and the previous step."""
    def moved(e: Estimate) -> torch.Tensor:
        return torch.tensor(e.fro > 0)

    prev_moved = moved(prev) if prev is not None else None
    u = step_sims(est.u, final.u, prev.u if prev is not None else None, moved(est), moved(final), prev_moved)
    v = step_sims(est.v, final.v, prev.v if prev is not None else None, moved(est), moved(final), prev_moved)
    s1 = float(est.s[0]) if est.s.numel() else 0.0
    return {
        "track_sim_final_u": float(u.final), "track_sim_final_v": float(v.final),
        "track_sim_prev_u": float(u.prev), "track_sim_prev_v": float(v.prev),
        "track_stable_rank": est.fro**2 / s1**2 if s1 > 0 else math.nan,
        "track_fro_norm": est.fro,
        "track_s1": s1,
    }


def run_values(cur: dict[str, Estimate], prev: dict[str, Estimate] | None) -> dict[str, float]:
    """LIVE_METRICS of one tracked step as run-level values: unweighted means over the matrices, each as
    ``step_values`` has it (Sim_K to the previous tracked step ``prev``). NaNs (a zero update, the first step)
    are left out of a mean; a metric NaN for every matrix is left out of the result."""
    sums, counts = dict.fromkeys(LIVE_METRICS, 0.0), dict.fromkeys(LIVE_METRICS, 0)
    for name, est in cur.items():
        values = step_values(est, est, prev.get(name) if prev is not None else None)
        for m in LIVE_METRICS:
            if not math.isnan(values[m]):
                sums[m] += values[m]
                counts[m] += 1
    return {m: sums[m] / counts[m] for m in LIVE_METRICS if counts[m]}
