"""The demo report's figures (PNG), seeds pooled: a line is the mean over matrices and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from geometry.lab.paper import PAPER_LOCALISATION, PAPER_SPARSITY
from geometry.lab.stats import interval
from geometry.lab.study import CONTROLS, MAIN, PROJECTED, VARIANTS, StudyResult, label
from geometry.offline.summary import ATTENTION_MODULES, RunSummary
from geometry.table import Row, Table

FRACTION = "fraction of training (step / the run's last step)"


def seed_pooled(table: Table, names: Sequence[str]) -> Table:
    """Rows relabelled run=name (seed dropped) and matrix=matrix@seed, so a plot's mean over matrices is a
    mean over matrices and seeds, and each step as a fraction of its run's last step, so that runs of different
    lengths (the reference study's) line up at 20% of training, where the locking claims are read."""
    keep = set(names)
    last: dict[str, int] = {}
    for r in table:
        last[r.run] = max(last.get(r.run, 0), r.step)
    out = []
    for r in table:
        name, _, seed = r.run.rpartition("/")
        if name in keep:
            step = r.step / last[r.run] if last[r.run] else r.step
            out.append(Row(name, step, f"{r.matrix}@{seed}", r.layer, r.module, r.metric, r.value))
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
    def pooled(kind: str) -> dict:  # every seed's curves under the bare run names, matrix@seed apart
        return {(run.rpartition("/")[0], step, f"{m}@{run.rpartition('/')[2]}"): v
                for (run, step, m), v in curves_by(a, kind).items() if run.rpartition("/")[0] in main}

    plots.angle_curves(pooled("angles_u"), ax[0], runs=main, stat="median")
    ax[0].set_title("principal angles, top-k U of W0 vs W_T (median over matrices and seeds)", fontsize=10)
    matrix = next(m for m in a.unique("matrix") if "mlp.up_proj" in m)
    seed0 = {(run.rpartition("/")[0], step, m): v for (run, step, m), v in curves_by(a, "spectrum").items()
             if run in {label(n, 0) for n in main}}
    plots.spectra(seed0, matrix, ax[1], runs=main)
    ax[1].set_title(f"relative spectral change, {matrix} (seed 0)", fontsize=10)
    save(fig, "angles_spectra.png")

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    plots.metric_over_steps(track_attn, "track_stable_rank", ax[0], runs=main,
                            ylabel="stable rank of D_t (per step, attention)")
    plots.metric_over_steps(track_attn, "track_fro_norm", ax[1], runs=main, ylabel="||D_t||_F (per step, attention)",
                            logy=True)
    for x in ax:
        x.set_xlabel(FRACTION)
    save(fig, "rank_norm.png")

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.2), layout="constrained")
    plots.locking(snaps_attn, ax[0], tau=tau, runs=main)
    ax[0].set_title(f"bf16 checkpoints, Sim_{K}, attention (mean over matrices and seeds)", fontsize=10)
    plots.locking(track_attn, ax[1], tracked=True, tau=tau, runs=main)
    ax[1].set_title(f"per step (float32 weights), Sim_{K}, attention", fontsize=10)
    plots.locking(track_attn, ax[2], tracked=True, tau=tau, runs=controls)
    ax[2].set_title(("OPD, its controls and variants" if len(controls) > 1 else "OPD") + ", per step, attention",
                    fontsize=10)
    for x in ax:
        x.set_xlabel(FRACTION)
    save(fig, "locking.png")

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    def per_seed(n: str, f) -> list[float]:
        return [100 * f(final[label(n, r.seed)]) for r in study.runs[n]]

    def mean_ci(values: list[float]) -> tuple[float, tuple[float, float]]:
        iv = interval(values)
        return iv.mean, (iv.lo, iv.hi) if iv.n > 1 else (iv.mean, iv.mean)

    sparsity = {n: per_seed(n, lambda s: s.final("sparsity_bf16")) for n in main}
    plots.bars(["bf16 sparsity"], {n: [mean_ci(v)[0]] for n, v in sparsity.items()}, ax[0],
               ylabel="% of entries unchanged (final)", points={n: [v] for n, v in sparsity.items()},
               errors={n: [mean_ci(v)[1]] for n, v in sparsity.items()},
               marks={n: [100 * PAPER_SPARSITY.get(n, float("nan"))] for n in main}, marks_label="paper (8B)")
    ax[0].set_title("update sparsity: mean over seeds, 95% interval, each seed", fontsize=10)
    loc = {n: [per_seed(n, lambda s: 1 - s.final("sparsity_bf16")),
               per_seed(n, lambda s: s.final("mask_overlap_principal")),
               per_seed(n, lambda s: s.final("mask_overlap_lowmag"))] for n in main}
    plots.bars(["update density", "principal-mask overlap", "low-magnitude overlap"],
               {n: [mean_ci(v)[0] for v in vs] for n, vs in loc.items()}, ax[1], ylabel="% (final checkpoint)",
               points=loc, errors={n: [mean_ci(v)[1] for v in vs] for n, vs in loc.items()},
               marks={n: [100 * x for x in PAPER_LOCALISATION[n]] for n in main if n in PAPER_LOCALISATION},
               marks_label="paper (8B)", baseline=100 * a.config.alpha,
               baseline_label=f"random mask overlap ({100 * a.config.alpha:.0f}%)")
    ax[1].set_title("localisation of the update mask: mean over seeds, 95% interval, each seed", fontsize=10)
    save(fig, "sparsity_localisation.png")

    pairs = [(b, p) for p, b in PROJECTED.items() if p in study.runs and b in study.runs]
    if pairs:
        def gains(name: str) -> list[float]:  # points gained over the run's start, by seed
            return [100 * (r.acc_after - r.acc_before) for r in study.runs[name]]

        series = {"unconstrained": [gains(b) for b, _ in pairs], "projected from 20%": [gains(p) for _, p in pairs]}
        fig = plots.bars([b.upper() for b, _ in pairs], {k: [mean_ci(v)[0] for v in vs] for k, vs in series.items()},
                         ylabel="accuracy gained over the run's start (points)", points=series,
                         errors={k: [mean_ci(v)[1] for v in vs] for k, vs in series.items()},
                         colors={"unconstrained": "#4c72b0", "projected from 20%": "#dd8452"},
                         baseline=0.0, baseline_label="the model the run starts from")
        fig.axes[0].set_title(f"gradient projection on the rank-{K} update subspace from 20%\n"
                              "gain: mean over seeds, 95% interval, each seed", fontsize=10)
        save(fig, "projection.png")
    return saved
