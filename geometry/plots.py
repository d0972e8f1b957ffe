"""Figures from an analysis table. Each function takes the table, accepts ``ax=``, returns the Figure.

The only module that imports matplotlib. Runs keep one colour everywhere, so SFT, RLVR and OPD
are told apart at a glance across figures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from geometry.experts import expert_of
from geometry.offline.summary import summarize
from geometry.table import Table

_KNOWN = {"sft": "#1f77b4", "rlvr": "#d62728", "opd": "#2ca02c"}
_OTHERS = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def group(run: str) -> str:
    """The run's family: "sft/s2" (seed 2 of sft) -> "sft"; seeds of one run share a colour and a legend entry."""
    return run.split("/", 1)[0]


def color(run: str, runs: Sequence[str] = ()) -> str:
    """A run's colour: fixed for the three regimes, cycling for the rest; one per family (``group``)."""
    key = group(run).lower()
    if key in _KNOWN:
        return _KNOWN[key]
    others = list(dict.fromkeys(group(r).lower() for r in runs if group(r).lower() not in _KNOWN)) or [key]
    return _OTHERS[others.index(key) % len(_OTHERS)] if key in others else _OTHERS[0]


def legend(ax, **kw) -> None:
    """One legend entry per family of runs (seeds of a run folded into "sft (3 runs)"), small and in two
    columns when there are many."""
    handles, labels = ax.get_legend_handles_labels()
    first: dict[str, tuple] = {}
    count: dict[str, int] = {}
    for h, label in zip(handles, labels, strict=True):
        head, _, rest = label.partition(" ")
        key = (group(head) + (" " + rest if rest else "")) if "/" in head else label
        first.setdefault(key, h)
        count[key] = count.get(key, 0) + 1
    shown = [f"{k} ({count[k]} runs)" if count[k] > 1 else k for k in first]
    many = len(shown) > 6
    ax.legend(list(first.values()), shown, frameon=False, fontsize=7 if many else None, ncol=2 if many else 1,
              **kw)


def panels(n: int, width: float = 6.0, height: float = 4.2, cols: int | None = None):
    """A new figure with n axes, ``cols`` to a row (default: all in one row): (figure, list of n axes)."""
    cols = min(n, cols or n)
    rows = -(-n // cols)
    fig, ax = plt.subplots(rows, cols, figsize=(width * cols, height * rows), layout="constrained", squeeze=False)
    axes = list(ax.flat)
    for extra in axes[n:]:
        extra.set_axis_off()
    return fig, axes[:n]


def _axes(ax, figsize=(6, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax.figure, ax


def metric_over_steps(table: Table, metric: str, ax=None, *, runs: Sequence[str] | None = None,
                      ylabel: str | None = None, logy: bool = False, band: bool = True):
    """Mean over matrices of one metric at each step, one line per run, with the inter-quartile band."""
    fig, ax = _axes(ax)
    runs = list(runs or table.unique("run"))
    for run in runs:
        rows = table.where(run=run, metric=metric)
        steps = sorted(rows.unique("step"))
        if not steps:
            continue
        vals = [np.array([v for v in rows.where(step=s).values() if np.isfinite(v)]) for s in steps]
        keep = [i for i, v in enumerate(vals) if v.size]
        steps, vals = [steps[i] for i in keep], [vals[i] for i in keep]
        c = color(run, runs)
        ax.plot(steps, [v.mean() for v in vals], marker="o" if len(steps) <= 30 else None, ms=3, color=c, label=run)
        if band and any(v.size > 1 for v in vals):
            ax.fill_between(steps, [np.percentile(v, 25) for v in vals], [np.percentile(v, 75) for v in vals],
                            color=c, alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel or metric)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    legend(ax)
    return fig


def locking(table: Table, ax=None, *, side: str = "v", tau: float = 0.9, tracked: bool = False,
            runs: Sequence[str] | None = None):
    """Sim_K of D_t's top-K subspace to the final update's, per run, with the locking threshold."""
    metric = f"{'track_' if tracked else ''}sim_final_{side}"
    fig = metric_over_steps(table, metric, ax, runs=runs, ylabel=f"Sim_K to final update ({side.upper()})")
    ax = fig.axes[0] if ax is None else ax
    ax.axhline(tau, color="k", ls="--", lw=0.8)
    ax.text(ax.get_xlim()[0], tau, f" tau = {tau}", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    return fig


def bars(groups: Sequence[str], series: dict[str, Sequence[float]], ax=None, *, ylabel: str = "",
         baseline: float | None = None, baseline_label: str = "random", colors: dict[str, str] | None = None,
         fmt: str = "{:.1f}", points: dict[str, Sequence[Sequence[float]]] | None = None,
         errors: dict[str, Sequence[tuple[float, float]]] | None = None,
         marks: dict[str, Sequence[float]] | None = None, marks_label: str = "paper"):
    """Grouped bars: one group per entry of ``groups``, one bar per series (e.g. per run); values printed while
    there are few enough bars to read them, group labels slanted when there are many groups.

    points: series -> per group the values behind the bar (one dot each, e.g. per seed); errors: series -> per
    group an interval (lo, hi) drawn as an error bar (e.g. the 95% interval of the mean); marks: series -> per
    group a reference value drawn as a black diamond (e.g. the paper's figure; NaN: none)."""
    fig, ax = _axes(ax)
    names = list(series)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(groups))
    marked = False
    for i, name in enumerate(names):
        vals = np.asarray(series[name], dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(vals), width, label=name, color=(colors or {}).get(name, color(name, names)))
        if errors and name in errors:
            lo, hi = np.asarray(errors[name], dtype=float).T
            ax.errorbar(pos, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="k", elinewidth=1, capsize=3)
        for j, values in enumerate((points or {}).get(name, ())):
            ax.scatter(np.full(len(values), pos[j]), values, s=12, color="k", alpha=0.6, zorder=3,
                       label="per seed" if i == 0 and j == 0 else None)
        for j, v in enumerate((marks or {}).get(name, ())):
            if np.isfinite(v):
                ax.scatter([pos[j]], [v], marker="D", s=30, color="k", zorder=4,
                           label=marks_label if not marked else None)
                marked = True
        if len(names) * len(groups) <= 24:  # at the bar's end, beyond its dots, error bar and mark
            dots, refs = (points or {}).get(name, ()), (marks or {}).get(name, ())
            for j, v in enumerate(vals):
                ends = [v, *(dots[j] if j < len(dots) else ()), *(errors[name][j] if errors and name in errors else ()),
                        *refs[j:j + 1]]
                ends = [e for e in ends if np.isfinite(e)] or [0.0]
                up = not np.isfinite(v) or v >= 0
                ax.annotate(fmt.format(v) if np.isfinite(v) else "n/a", (pos[j], max(ends) if up else min(ends)),
                            xytext=(0, 5 if up else -5), textcoords="offset points", ha="center",
                            va="bottom" if up else "top", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=0.8, label=baseline_label)
    ax.set_xticks(x, groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center",
                  fontsize=8 if len(groups) > 6 else None)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    return fig


def localisation(table: Table, ax=None, *, runs: Sequence[str] | None = None, alpha: float = 0.3):
    """The paper's localisation table as bars: density, principal-mask and low-magnitude-mask overlap (%);
    alpha, the masks' fraction, is the random baseline of either overlap."""
    summaries = {s.run: s for s in summarize(table)}
    runs = list(runs or summaries)
    series = {r: [100 * (1 - summaries[r].final("sparsity_bf16")), 100 * summaries[r].final("mask_overlap_principal"),
                  100 * summaries[r].final("mask_overlap_lowmag")] for r in runs}
    return bars(["update density", "principal-mask overlap", "low-magnitude overlap"], series, ax,
                ylabel="% (final checkpoint)", baseline=100 * alpha,
                baseline_label=f"random mask overlap ({100 * alpha:.0f}%)")


def angle_curves(curves: dict[tuple[str, int, str], np.ndarray], ax=None, *, step: int | None = None,
                 runs: Sequence[str] | None = None, stat: str = "mean"):
    """Principal angles (degrees) vs index i of the top-k subspace, the mean (or ``stat="median"``) over matrices,
    at the last step."""
    fig, ax = _axes(ax)
    runs = list(runs or dict.fromkeys(r for r, _, _ in curves))
    for run in runs:
        steps = sorted({s for r, s, _ in curves if r == run})
        if not steps:
            continue
        at = step if step is not None else steps[-1]
        stack = [v for (r, s, _), v in curves.items() if r == run and s == at]
        n = min(len(v) for v in stack)
        pooled = (np.median if stat == "median" else np.mean)([v[:n] for v in stack], axis=0)
        ax.plot(np.arange(1, n + 1), pooled, color=color(run, runs), label=f"{run} (step {at})")
    ax.set_xlabel("principal angle index i (ascending)")
    ax.set_ylabel("angle (degrees)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    return fig


def spectra(curves: dict[tuple[str, int, str], np.ndarray], matrix: str, ax=None, *, runs: Sequence[str] | None = None):
    """Singular values of one matrix: the base (dashed) and each run's final W_t, with the relative shift."""
    fig, ax = _axes(ax)
    runs = list(runs or dict.fromkeys(r for r, _, _ in curves))
    for run in runs:
        steps = sorted(s for r, s, m in curves if r == run and m == matrix)
        if not steps:
            continue
        base, final = curves[(run, steps[0], matrix)], curves[(run, steps[-1], matrix)]
        shift = np.abs(final - base) / np.maximum(base, 1e-30)
        ax.semilogy(np.arange(1, len(shift) + 1), shift, color=color(run, runs), label=f"{run} (step {steps[-1]})")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("|s_i(W_t) - s_i(W_0)| / s_i(W_0)")
    ax.set_title(matrix, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    return fig



_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def heatmap(table: Table, metric: str, ax=None, *, run: str | None = None, step: int | None = None,
            vmin: float | None = None, vmax: float | None = None):
    """One metric over layer x module at one step (default: the run's last), one cell per matrix: where in the
    network an update sits. Cells with no matrix (or a NaN value) stay blank; give vmin/vmax to share a colour
    scale between panels. Experts' matrices have their own layer x expert view (``expert_heatmap``)."""
    run = run or table.unique("run")[0]
    rows = Table([r for r in table.where(run=run, metric=metric) if expert_of(r.matrix) is None])
    at = step if step is not None else max(rows.unique("step"), default=None)
    rows = rows.where(step=at)
    layers = sorted({r.layer for r in rows if r.layer is not None})
    modules = sorted(dict.fromkeys(r.module for r in rows if r.layer is not None),
                     key=lambda m: (_MODULE_ORDER.index(m) if m in _MODULE_ORDER else len(_MODULE_ORDER), m))
    grid = np.full((len(layers), len(modules)), np.nan)
    for r in rows:
        if r.layer is not None:
            grid[layers.index(r.layer), modules.index(r.module)] = r.value
    fig, ax = _axes(ax, figsize=(1.2 + 0.8 * max(1, len(modules)), 1.2 + 0.35 * max(1, len(layers))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(f"{run}: {metric} at step {at}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def expert_heatmap(grid, metric: str, ax=None, *, label: str | None = None):
    """A mixture-of-experts run's metric over layer x expert (geometry.offline.moe.ExpertGrid): each cell the
    mean over that expert's matrices at the run's last step."""
    values = grid.grids[metric]
    fig, ax = _axes(ax, figsize=(max(6.0, min(16.0, 2.0 + 0.3 * len(grid.experts))), 2.0 + 0.3 * len(grid.layers)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    step_x = max(1, len(grid.experts) // 32)  # at most ~32 tick labels
    ax.set_xticks(range(0, len(grid.experts), step_x), [str(e) for e in grid.experts[::step_x]], fontsize=8)
    ax.set_yticks(range(len(grid.layers)), [str(layer) for layer in grid.layers], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{grid.run}, step {grid.step}: {label or metric}\n(mean over each expert's matrices)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def run_grid(runs: Sequence[str], grid: np.ndarray, ax=None, *, title: str = "", vmin: float | None = None,
             vmax: float | None = None, cmap: str = "viridis"):
    """A run x run grid (geometry.offline.pairs.Pairs.grid): one cell per pair of runs, its value written in it
    when the runs are few; a blank cell was not compared (the diagonal, runs of other bases)."""
    fig, ax = _axes(ax, figsize=(2.0 + 0.5 * len(runs), 1.6 + 0.5 * len(runs)))
    image = ax.imshow(grid, cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(runs)), runs, fontsize=8)
    if len(runs) <= 12:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="k" if image.norm(v) > 0.6 else "w")  # dark on viridis' light end
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
