"""Experts at a glance: a mixture-of-experts run's experts and routers, for summary.md and the report.

Each expert's matrices (gate, up, down: docs/metrics.md item 13) are measured like any other; here they are
gathered by layer and expert at a run's last step. An expert's value of a metric is its matrices' mean:
bf16 sparsity (item 1), relative norm ||D||_F / ||W0||_F, and the update's principal-direction overlap
(item 4, full suite only). Which experts moved most and least is read from the relative norm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from geometry.experts import expert_of
from geometry.offline.markdown import fmt
from geometry.table import Table

METRICS = (("sparsity_bf16", "bf16 sparsity (%)", "%"), ("rel_norm", "relative norm ||D||_F / ||W0||_F", "g"),
           ("overlap_2s", "principal overlap (two-sided, item 4)", "g"))
ROUTERS = frozenset({"gate", "router"})  # the module names of MoE routers (geometry.capture.matrices)
FULL_TABLE = 64  # (layer, expert) rows shown in summary.md; beyond it, the most and least moved


class ExpertGrid(NamedTuple):
    """One run's experts at one step: metric -> (layers, experts) grid of the experts' mean values."""

    run: str
    step: int
    layers: list[int]
    experts: list[int]
    grids: dict[str, np.ndarray]  # metric -> (len(layers), len(experts)), NaN where there is no value


def expert_grid(table: Table, run: str) -> ExpertGrid | None:
    """The run's experts at its last step; None when the run has no expert matrices."""
    rows = [r for r in table.where(run=run) if r.step and r.layer is not None and expert_of(r.matrix) is not None]
    if not rows:
        return None
    step = max(r.step for r in rows)
    rows = [r for r in rows if r.step == step]
    layers = sorted({r.layer for r in rows})
    experts = sorted({expert_of(r.matrix) for r in rows})
    grids = {}
    for metric, _, _ in METRICS:
        cells: dict[tuple[int, int], list[float]] = {}
        for r in rows:
            if r.metric == metric and math.isfinite(r.value):
                cells.setdefault((r.layer, expert_of(r.matrix)), []).append(r.value)
        if not cells:
            continue
        grid = np.full((len(layers), len(experts)), np.nan)
        for (layer, e), values in cells.items():
            grid[layers.index(layer), experts.index(e)] = float(np.mean(values))
        grids[metric] = grid
    return ExpertGrid(run, step, layers, experts, grids)


def moved(grid: ExpertGrid, n: int = 3) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """The n experts that moved most and least by relative norm: (layer, expert, value) each."""
    g = grid.grids.get("rel_norm")
    if g is None:
        return [], []
    cells = sorted(((float(g[i, j]), grid.layers[i], grid.experts[j]) for i in range(g.shape[0])
                    for j in range(g.shape[1]) if math.isfinite(g[i, j])), reverse=True)
    pick = min(n, len(cells) // 2) or min(n, len(cells))
    return [(layer, e, v) for v, layer, e in cells[:pick]], [(layer, e, v) for v, layer, e in cells[::-1][:pick]]


def markdown(table: Table) -> str:
    """The "Experts" section of summary.md: per MoE run, the statement of which experts moved most and least,
    the layer x expert table (or its extremes) and the routers' rows; empty for a model without experts."""
    parts = []
    for run in table.unique("run"):
        grid = expert_grid(table, run)
        if grid is None:
            continue
        parts.append(_run_section(table, grid))
    if not parts:
        return ""
    return "## Experts\n\n" + "\n".join(parts)


def _run_section(table: Table, grid: ExpertGrid) -> str:
    most, least = moved(grid)
    say = ", ".join(f"layer {layer} expert {e} ({fmt(v, 'g')})" for layer, e, v in most)
    said = ", ".join(f"layer {layer} expert {e} ({fmt(v, 'g')})" for layer, e, v in least)
    lines = [f"### {grid.run}, step {grid.step}: {len(grid.layers)} layers x {len(grid.experts)} experts", ""]
    if most:
        lines += [f"Moved most (relative norm): {say}. Moved least: {said}. An expert's value is the mean over "
                  "its matrices (gate, up, down).", ""]
    metrics = [(m, label, kind) for m, label, kind in METRICS if m in grid.grids]
    cells = [(i, j) for i in range(len(grid.layers)) for j in range(len(grid.experts))]
    if len(cells) > FULL_TABLE and "rel_norm" in grid.grids:
        keep = {(grid.layers.index(layer), grid.experts.index(e)) for layer, e, _ in (*moved(grid, 10)[0],
                                                                                      *moved(grid, 10)[1])}
        cells = sorted(keep, key=lambda c: -grid.grids["rel_norm"][c])
        total = len(grid.layers) * len(grid.experts)
        lines += [f"The 10 experts that moved most and the 10 that moved least of {total} (all of them: the "
                  "layer x expert figures of the report, and metrics.csv).", ""]
    lines.append("| layer | expert | " + " | ".join(label.replace("|", "\\|") for _, label, _ in metrics) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in metrics) + " |")
    for i, j in cells:
        lines.append(f"| {grid.layers[i]} | {grid.experts[j]} | "
                     + " | ".join(fmt(float(grid.grids[m][i, j]), kind) for m, _, kind in metrics) + " |")
    routers = [r for r in table.where(run=grid.run, step=grid.step) if r.module in ROUTERS]
    if routers:
        lines += ["", "Routers:", "", "| matrix | " + " | ".join(label.replace("|", "\\|") for _, label, _ in metrics)
                  + " |", "| --- | " + " | ".join("---" for _ in metrics) + " |"]
        values = {(r.matrix, r.metric): r.value for r in routers}
        for matrix in dict.fromkeys(r.matrix for r in routers):
            lines.append(f"| {matrix} | " + " | ".join(fmt(values.get((matrix, m), math.nan), kind)
                                                      for m, _, kind in metrics) + " |")
    return "\n".join(lines) + "\n"
