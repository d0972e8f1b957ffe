"""The standard figures of an analysis, and report.md / report.html that embed them beside summary.md.

Figures are rendered to PNG bytes in memory (geometry.plots draws them), so the writer can land them with
the other outputs, all or nothing. The HTML report is one self-contained file: figures inlined as base64,
no script, nothing fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import math

from geometry import plots
from geometry.offline import moe
from geometry.offline.analyze import Analysis, curves_by
from geometry.offline.markdown import to_html
from geometry.offline.summary import ATTENTION_MODULES, summarize

HEATMAP_METRICS = ("sparsity_bf16", "overlap_2s_ratio", "stable_rank")  # where in the network each update sits
# runs against each other at their final steps (docs/metrics.md item 10): metric, title, colour scale
PAIR_GRIDS = (("pair_mask_jaccard", "Jaccard of changed masks", {"vmin": 0.0, "vmax": 1.0}),
              ("pair_mask_overlap_ratio", "changed entries shared / by chance (1: independent)", {"vmin": 0.0}),
              ("pair_update_cosine", "update cosine (all matrices)", {"vmin": -1.0, "vmax": 1.0}),
              ("pair_sim_v", "Sim_K of the right update subspaces (mean)", {"vmin": 0.0, "vmax": 1.0}))


def standard_figures(analysis: Analysis, heatmaps: tuple[str, ...] = HEATMAP_METRICS) -> dict[str, bytes]:
    """File name -> PNG of each standard figure: sparsity and localisation, angles and spectra, rank and norm,
    locking (all matrices and attention only), a layer x module heatmap per metric in ``heatmaps``, and where
    runs share a base, run x run grids of their pair metrics (``PAIR_GRIDS``)."""
    a, cfg = analysis, analysis.config
    runs = a.unique("run")
    summaries = {s.run: s for s in summarize(a, cfg.tau)}
    out = {}

    # the quick suite (--quick) measures the update alone: no masks, angles or spectra to draw
    masks = len(a.where(metric="mask_overlap_principal")) > 0
    fig, ax = plots.panels(2 if masks else 1, width=max(6.0, 0.45 * len(runs)))
    final = {m: [100 * summaries[r].final(m) for r in runs] for m in ("sparsity_bf16", "mask_overlap_principal",
                                                                      "mask_overlap_lowmag")}
    plots.bars(runs, {"bf16 sparsity": final["sparsity_bf16"]}, ax[0], ylabel="% of entries unchanged",
               colors={"bf16 sparsity": "#4c72b0"})
    ax[0].set_title("update sparsity at the final step")
    if masks:
        plots.bars(runs, {"update density": [100 - v for v in final["sparsity_bf16"]],
                          "principal-mask overlap": final["mask_overlap_principal"],
                          "low-magnitude overlap": final["mask_overlap_lowmag"]}, ax[1], ylabel="% (final step)",
                   baseline=100 * cfg.alpha, baseline_label=f"random mask overlap ({100 * cfg.alpha:.0f}%)")
        ax[1].set_title("localisation of the update mask")
    out["sparsity_localisation.png"] = plots.png(fig)

    if curves_by(a, "angles_u"):
        fig, ax = plots.panels(2)
        plots.angle_curves(curves_by(a, "angles_u"), ax[0], runs=runs)
        ax[0].set_title("principal angles, top-k U of W0 vs W_t (mean over matrices)")
        matrix = _most_shifted(a)
        if matrix is not None:
            plots.spectra(curves_by(a, "spectrum"), matrix, ax[1], runs=runs)
        out["angles_spectra.png"] = plots.png(fig)

    fig, ax = plots.panels(2)
    plots.metric_over_steps(a, "stable_rank", ax[0], runs=runs, ylabel="stable rank of D_t")
    plots.metric_over_steps(a, "fro_norm", ax[1], runs=runs, ylabel="||D_t||_F", logy=True)
    out["rank_norm.png"] = plots.png(fig)

    fig, ax = plots.panels(2)
    plots.locking(a, ax[0], tau=cfg.tau, runs=runs)
    ax[0].set_title(f"all matrices ({len(a.unique('matrix'))})")
    attention = a.where(module=tuple(ATTENTION_MODULES))
    if len(attention):
        plots.locking(attention, ax[1], tau=cfg.tau, runs=runs)
    ax[1].set_title("attention matrices q/k/v/o (the paper's view)")
    out["locking.png"] = plots.png(fig)

    first = list({plots.group(r): r for r in reversed(runs)}.values())[::-1]  # one run a family (its first seed)
    for metric in heatmaps:
        if not len(a.where(metric=metric)):
            continue
        fig, ax = plots.panels(len(first), width=4.5, height=3.6, cols=3)
        values = [v for v in a.where(metric=metric).values() if math.isfinite(v)]
        scale = {"vmin": min(values), "vmax": max(values)} if values else {}
        for i, run in enumerate(first):
            plots.heatmap(a, metric, ax[i], run=run, **scale)  # one colour scale: runs compare cell by cell
        out[f"heatmap_{metric}.png"] = plots.png(fig)

    if a.pairs.summaries:  # runs of one base compared with each other (geometry.offline.pairs)
        n = len(a.pairs.grid(PAIR_GRIDS[0][0])[0])  # runs compared
        side = min(10.0, 2.5 + 0.45 * n)  # inches a panel, at most 10 however many runs
        fig, ax = plots.panels(len(PAIR_GRIDS), width=max(4.5, side), height=max(3.8, side - 0.5), cols=2)
        for i, (metric, title, scale) in enumerate(PAIR_GRIDS):
            plots.run_grid(*a.pairs.grid(metric), ax[i], title=title, **scale)
        out["pairs_heatmap.png"] = plots.png(fig)

    for run in first:  # mixture-of-experts runs: each metric over layer x expert
        grid = moe.expert_grid(a, run)
        for metric, label, _ in moe.METRICS if grid is not None else ():
            if metric in grid.grids:
                out[f"experts_{metric}_{_file_safe(run)}.png"] = plots.png(plots.expert_heatmap(grid, metric,
                                                                                                 label=label))
    return out


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _most_shifted(a: Analysis) -> str | None:
    """The matrix with the largest final spectral shift in the first run: the spectrum most worth a look."""
    if not len(a):
        return None
    run = a.rows[0].run
    rows = a.where(run=run, metric="nss")
    if not len(rows):
        return None
    last = max(rows.unique("step"))
    return max(rows.where(step=last), key=lambda r: (r.value, r.matrix)).matrix


def report_markdown(summary_md: str, figures: dict[str, bytes], folder: str = "figures") -> str:
    """summary.md followed by the figures, linked from ``folder``."""
    parts = [summary_md.rstrip(), "", "## Figures", ""]
    parts += [f"![{name.removesuffix('.png')}]({folder}/{name})\n" for name in figures]
    return "\n".join(parts) + "\n"


def report_html(summary_md: str, figures: dict[str, bytes], title: str = "geometry report") -> str:
    """One self-contained HTML page: the summary's headings, paragraphs, lists and tables, then the figures
    inlined as base64 PNGs."""
    body = to_html(summary_md)
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{html.escape(name.removesuffix('.png'))}</figcaption></figure>"
        for name, data in figures.items())
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}\n<h2>Figures</h2>\n{images}\n</body></html>\n")

