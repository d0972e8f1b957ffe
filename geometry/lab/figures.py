"""The demo report's figures (PNG), seeds pooled: a line is the mean over matrices and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from geometry.lab.stats import interval
from geometry.lab.study import CONTROLS, MAIN, PROJECTED, VARIANTS, StudyResult, label
from geometry.offline.summary import ATTENTION_MODULES, RunSummary
from geometry.table import Row, Table


def seed_pooled(table: Table, names: Sequence[str]) -> Table:
    """Rows relabelled run=name (seed dropped) and matrix=matrix@seed, so a plot's mean over matrices is a
    mean over matrices and seeds."""
    keep = set(names)
    out = []
    for r in table:
        name, _, seed = r.run.rpartition("/")
        if name in keep:
            out.append(Row(name, r.step, f"{r.matrix}@{seed}", r.layer, r.module, r.metric, r.value))
    return Table(out)


def figures(study: StudyResult, final: dict[str, RunSummary], fig_dir: Path) -> list[str]:
    """PNG figures; returns their file names. final: the RunSummary (all matrices) of each run label."""
    import matplotlib.pyplot as plt

    from geometry import plots
    from geometry.offline.analyze import curves_by

    fig_dir.mkdir(parents=True, exist_ok=True)
    a, K, tau = study.analysis, study.config.lock_k, study.analysis.config.tau
    main = [n for n in MAIN if n in study.runs]
    controls = ["opd", *[n for n in (*CONTROLS, *VARIANTS) if n in study.runs]]
    attn = sorted(ATTENTION_MODULES)
    track_attn = seed_pooled(study.tracking.where(module=attn), [*main, *controls])
    snaps_attn = seed_pooled(a.where(module=attn), [*main, *controls])
    saved = []

    def save(fig, name: str) -> None:
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        saved.append(name)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    def seed0(kind: str) -> dict:  # seed 0's curves under the bare run names (colours as in the other figures)
        return {(run.rpartition("/")[0], step, m): v for (run, step, m), v in curves_by(a, kind).items()
                if run in {label(n, 0) for n in main}}

    plots.angle_curves(seed0("angles_u"), ax[0], runs=main)
    ax[0].set_title("principal angles, top-k U of W0 vs W_T (seed 0, mean over matrices)", fontsize=9)
    matrix = next(m for m in a.unique("matrix") if "mlp.up_proj" in m)
    plots.spectra(seed0("spectrum"), matrix, ax[1], runs=main)
    ax[1].set_title(f"relative spectral change, {matrix} (seed 0)", fontsize=9)
    save(fig, "angles_spectra.png")

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    plots.metric_over_steps(track_attn, "track_stable_rank", ax[0], runs=main,
                            ylabel="stable rank of D_t (per step, attention)")
    plots.metric_over_steps(track_attn, "track_fro_norm", ax[1], runs=main, ylabel="||D_t||_F (per step, attention)",
                            logy=True)
    save(fig, "rank_norm.png")

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.2), layout="constrained")
    plots.locking(snaps_attn, ax[0], tau=tau, runs=main)
    ax[0].set_title(f"bf16 checkpoints, Sim_{K}, attention (mean over matrices and seeds)", fontsize=9)
    plots.locking(track_attn, ax[1], tracked=True, tau=tau, runs=main)
    ax[1].set_title(f"per step (float32 weights), Sim_{K}, attention", fontsize=9)
    plots.locking(track_attn, ax[2], tracked=True, tau=tau, runs=controls)
    ax[2].set_title("OPD, its controls and variants, per step, attention", fontsize=9)
    save(fig, "locking.png")

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    sp = {n: 100 * interval([final[label(n, r.seed)].final("sparsity_bf16") for r in study.runs[n]]).mean
          for n in main}
    plots.bars(["bf16 sparsity"], {n: [v] for n, v in sp.items()}, ax[0], ylabel="% (mean over seeds)")
    ax[0].set_title("update sparsity (final)")
    plots.localisation(seed_pooled(a, main), ax[1], runs=main, alpha=a.config.alpha)
    ax[1].set_title("localisation of the update mask (seeds pooled)")
    save(fig, "sparsity_localisation.png")

    pairs = [(b, p) for p, b in PROJECTED.items() if p in study.runs and b in study.runs]
    if pairs:
        def acc(name: str) -> float:
            return 100 * interval([r.acc_after for r in study.runs[name]]).mean

        series = {"unconstrained": [acc(b) for b, _ in pairs], "projected from 20%": [acc(p) for _, p in pairs]}
        fig = plots.bars([b.upper() for b, _ in pairs], series, ylabel="task accuracy (%), mean over seeds",
                         colors={"unconstrained": "#4c72b0", "projected from 20%": "#dd8452"},
                         baseline=100 * study.runs[pairs[0][0]][0].acc_before, baseline_label="student before")
        fig.axes[0].set_title(f"gradient projection on the rank-{K} update subspace")
        save(fig, "projection.png")
    return saved
