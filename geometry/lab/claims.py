"""The paper's claims as pairs (SPEC "The paper's claims, as pairs"), each decided from per-seed values.

Two halves: the per-seed values of each regime (functions of a run's summary, a run's accuracy), and the
claims, which only arrange those values into pairs for geometry.lab.stats to decide. Where a value comes
from (bf16 checkpoints, per-step tracking) is chosen in the first half alone: ``trajectory_values`` is the
one place the trajectory claims read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from geometry.lab.stats import Interval, Pair, PairResult, decide, interval, verdict
from geometry.lab.study import CONTROLS, PROJECTED, StudyResult, label
from geometry.locking import locking_onset, median_onset
from geometry.offline.summary import ATTENTION_MODULES, RunSummary, summarize

EARLY = 0.2  # "the first checkpoint (~20% of training)", where the paper reads Sim_K and starts projecting
# Projection (docs/metrics.md item 9) "hurts" when the share of the training gain it loses lies above this margin,
# and "does not hurt" when it lies below. A tenth of the gain: the non-inferiority convention of keeping 90% of an
# effect; a smaller loss is within what a reader would call the same result. Fixed before the runs it decides.
PROJECTION_MARGIN = 0.10

PerSeed = dict[int, float]  # seed -> value


class Claim(NamedTuple):
    """One claim decided from its pairs (geometry.lab.stats)."""

    text: str
    pairs: list[PairResult]
    verdict: str  # reproduced / contradicted / partly / inconclusive
    evidence: str  # the figure that decides it: each regime's mean [95% interval] over seeds
    kind: str  # how its differences print (geometry.offline.markdown.fmt)


# ---- per-seed values ----


class Views(NamedTuple):
    """RunSummaries by run label: over all matrices, and over the attention matrices only."""

    all: dict[str, RunSummary]
    attn: dict[str, RunSummary]


def views(study: StudyResult) -> Views:
    tau = study.analysis.config.tau
    attn = study.analysis.where(module=sorted(ATTENTION_MODULES))
    return Views({s.run: s for s in summarize(study.analysis, tau)}, {s.run: s for s in summarize(attn, tau)})


def seeds_of(study: StudyResult, name: str) -> list[int]:
    return [r.seed for r in study.runs.get(name, [])]


def per_seed(study: StudyResult, S: Mapping[str, RunSummary], name: str, f: Callable[[RunSummary], float]
             ) -> PerSeed:
    """f of each seed's summary of run ``name``, by seed."""
    return {s: f(S[label(name, s)]) for s in seeds_of(study, name) if label(name, s) in S}


def at(s: RunSummary, metric: str, frac: float) -> float:
    """A run-level metric at the checkpoint nearest to frac of training."""
    i = min(range(len(s.steps)), key=lambda j: abs(s.steps[j] - frac * s.steps[-1]))
    return s.per_step[metric][i]


def growth(s: RunSummary) -> float:
    """Stable rank of D_T over stable rank at the EARLY checkpoint."""
    return s.final("stable_rank") / at(s, "stable_rank", EARLY)


def band(s: RunSummary) -> float:
    """Relative range (max - min) / mean of the stable rank over the checkpoints from EARLY on."""
    vals = [v for st, v in zip(s.steps, s.per_step["stable_rank"], strict=True) if st >= EARLY * s.steps[-1]]
    return (max(vals) - min(vals)) / float(np.mean(vals)) if vals else math.nan


def sim_early(s: RunSummary) -> float:
    """Sim_K (right subspace) of D_t to the final update at the EARLY checkpoint."""
    return at(s, "sim_final_v", EARLY)


class Trajectories(NamedTuple):
    """The values the trajectory claims read, per run name and seed, and the words saying where from."""

    sim_early: dict[str, PerSeed]
    growth: dict[str, PerSeed]
    band: dict[str, PerSeed]
    source: str


def trajectory_values(study: StudyResult, V: Views, names: tuple[str, ...]) -> Trajectories:
    """Sim_K at 20%, stable-rank growth and band per seed, from the per-step tracking of the trained (float32)
    weights, attention matrices (SPEC "How the study decides": what training did, not its bf16 rounding)."""
    def of(metric: str, f: Callable[[list[tuple[int, float]]], float]) -> dict[str, PerSeed]:
        return {n: {r.seed: f(tracked_curve(study, n, r.seed, metric)) for r in study.runs.get(n, [])}
                for n in names}
    sims = of("track_sim_final_v", lambda c: _nearest(c, EARLY))
    grows = of("track_stable_rank", lambda c: c[-1][1] / _nearest(c, EARLY) if c else math.nan)
    bands = of("track_stable_rank", _band)
    return Trajectories(sims, grows, bands, "per-step tracking of the float32 weights, attention matrices")


def tracked_curve(study: StudyResult, name: str, seed: int, metric: str) -> list[tuple[int, float]]:
    """(step, mean over the attention matrices) of a tracked metric of one run, in step order."""
    rows = study.tracking.where(run=label(name, seed), metric=metric, module=sorted(ATTENTION_MODULES))
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if math.isfinite(r.value):
            by_step.setdefault(r.step, []).append(r.value)
    return [(st, float(np.mean(v))) for st, v in sorted(by_step.items())]


def tracked_onsets(study: StudyResult, name: str, seed: int, tau: float) -> int | None:
    """The run's locking onset located per step (docs/metrics.md item 7): per attention matrix from its tracked
    Sim_K (V) to the final update, the median over matrices."""
    rows = study.tracking.where(run=label(name, seed), metric="track_sim_final_v", module=sorted(ATTENTION_MODULES))
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        curves.setdefault(r.matrix, []).append((r.step, r.value))
    onsets = [locking_onset([s for s, _ in c], [v for _, v in c], tau) for c in curves.values()]
    return median_onset(onsets)


def _nearest(curve: list[tuple[int, float]], frac: float) -> float:
    """The value at the tracked step nearest frac of the run's last."""
    if not curve:
        return math.nan
    return min(curve, key=lambda sv: abs(sv[0] - frac * curve[-1][0]))[1]


def _band(curve: list[tuple[int, float]]) -> float:
    """Relative range (max - min) / mean over the tracked steps from EARLY on."""
    vals = [v for st, v in curve if curve and st >= EARLY * curve[-1][0]]
    return (max(vals) - min(vals)) / float(np.mean(vals)) if vals else math.nan


def accuracy(study: StudyResult, name: str) -> PerSeed:
    return {r.seed: r.acc_after for r in study.runs.get(name, [])}


def share_lost(study: StudyResult, free: str, proj: str) -> PerSeed:
    """(acc_free - acc_projected) / (acc_free - acc_start) by seed: the share of the training gain that the
    projection loses (the two runs share their first 20% exactly). NaN where training gained nothing."""
    start = {r.seed: r.acc_before for r in study.runs.get(free, [])}
    a, p = accuracy(study, free), accuracy(study, proj)
    return {s: (a[s] - p[s]) / (a[s] - start[s]) if a[s] > start[s] else math.nan for s in a if s in p}


def control_distance(study: StudyResult, traj: Trajectories, run: str) -> PerSeed:
    """|dSim_K at 20%| + |log ratio of stable-rank growth| of a control from on-policy OPD, by seed."""
    sim, g = traj.sim_early, traj.growth
    return {s: abs(sim[run][s] - sim["opd"][s]) + abs(math.log(g[run][s] / g["opd"][s]))
            for s in sim[run] if s in sim["opd"] and s in g[run] and s in g["opd"]}


# ---- claims ----

UP = {"sft": "SFT", "rlvr": "RLVR", "opd": "OPD"}
ORDER = ("sft", "opd", "rlvr")  # the paper's orderings run SFT, OPD, RLVR


def _shown(values: Mapping[str, PerSeed], kind: str) -> str:
    return "; ".join(f"{UP.get(r, r)} {interval(list(v.values())).show(kind)}" for r, v in values.items())


def ascending(values: Mapping[str, PerSeed], order: tuple[str, ...]) -> list[Pair]:
    """The chain order[0] < order[1] < ... as its adjacent pairs."""
    return [Pair(f"{UP[a]} < {UP[b]}", values[b], values[a]) for a, b in zip(order, order[1:], strict=False)]


def descending(values: Mapping[str, PerSeed], order: tuple[str, ...]) -> list[Pair]:
    """The chain order[0] > order[1] > ... as its adjacent pairs."""
    return [Pair(f"{UP[a]} > {UP[b]}", values[a], values[b]) for a, b in zip(order, order[1:], strict=False)]


def claim(text: str, pairs: list[Pair], evidence: str, kind: str = "g") -> Claim:
    decided = decide(pairs)
    return Claim(text, decided, verdict([p.status for p in decided]), evidence, kind)


def claims(study: StudyResult, V: Views) -> list[Claim]:
    """SPEC's claims as pairs, in its order, then the paper's controls where the study ran them; no pair is tested
    twice."""
    def final(metric: str) -> dict[str, PerSeed]:
        return {r: per_seed(study, V.all, r, lambda s: s.final(metric)) for r in ORDER}

    sp, low, prin = final("sparsity_bf16"), final("mask_overlap_lowmag"), final("mask_overlap_principal")
    ratio2s, ang, nss = final("overlap_2s_ratio"), final("angle_max_u"), final("nss")
    controls = all(c in study.runs for c in CONTROLS)  # the reference study runs none
    traj = trajectory_values(study, V, (*ORDER, *CONTROLS) if controls else ORDER)
    sim = {r: traj.sim_early[r] for r in ORDER}
    g, b = {r: traj.growth[r] for r in ORDER}, {r: traj.band[r] for r in ORDER}
    K, tau = study.config.lock_k, study.analysis.config.tau
    sfo = ORDER
    out = [
        claim("bf16 update sparsity orders SFT < OPD < RLVR", ascending(sp, sfo),
              f"bf16 sparsity (%), all matrices: {_shown(sp, '%')}", "%"),
        claim("principal-mask overlap orders SFT > OPD > RLVR: OPD's update avoids W0's principal directions "
              "more than SFT's, less than RLVR's (the paper's headline)", descending(prin, sfo),
              f"principal-mask overlap (%), all matrices: {_shown(prin, '%')}; beside it, not decided: two-sided "
              f"overlap of the update with W0's top-k subspaces, ratio to a random update's: {_shown(ratio2s, 'g')}",
              "%"),
        claim("low-magnitude-mask overlap orders SFT < OPD < RLVR", ascending(low, sfo),
              f"low-magnitude-mask overlap (%), all matrices: {_shown(low, '%')}", "%"),
        claim("max principal angle orders SFT > OPD > RLVR", descending(ang, sfo),
              f"max principal angle of U_k (deg), mean over matrices: {_shown(ang, 'deg')}", "deg"),
        claim("normalised spectral shift orders SFT > OPD > RLVR", descending(nss, sfo),
              f"NSS, mean over matrices: {_shown(nss, 'e')}", "e"),
        claim(f"at 20% of training OPD's update is closer to its final subspace than SFT's and RLVR's (Sim_{K})",
              [Pair("OPD > SFT", sim["opd"], sim["sft"]), Pair("OPD > RLVR", sim["opd"], sim["rlvr"])],
              f"Sim_{K} (V) to the final update at 20%, {traj.source}: {_shown(sim, 'g')}"),
        claim(f"at 20% of training OPD's update is already locked: Sim_{K} >= {tau:g}",
              [Pair(f"OPD >= {tau:g}", sim["opd"], tau)],
              f"OPD's Sim_{K} (V) at 20%, {traj.source}: {interval(list(sim['opd'].values())).show()}"),
        claim("stable rank of the update from 20% to the end: SFT's grows, RLVR's shrinks, OPD's stays in the "
              "narrowest relative band",
              [Pair("SFT grows (final / 20% > 1)", g["sft"], 1.0), Pair("RLVR shrinks (final / 20% < 1)", 1.0,
                                                                         g["rlvr"]),
               Pair("OPD band < SFT band", b["sft"], b["opd"]), Pair("OPD band < RLVR band", b["rlvr"], b["opd"])],
              f"stable rank final / 20%, {traj.source}: {_shown(g, 'g')}; relative band (max - min) / mean from "
              f"20%: {_shown(b, 'g')}"),
    ]
    shares = {base: share_lost(study, base, proj) for proj, base in PROJECTED.items()}
    m = PROJECTION_MARGIN
    out.append(claim(
        f"projecting gradients on the rank-{K} update subspace from 20% hurts SFT but not OPD",
        [Pair(f"SFT hurt (share of gain lost > {100 * m:g}%)", shares["sft"], m),
         Pair(f"OPD not hurt (share of gain lost < {100 * m:g}%)", m, shares["opd"])],
        f"share of the training gain lost, (acc_free - acc_projected) / (acc_free - acc_start), paired by seed "
        f"(%): {_shown(shares, '%')}; margin {100 * m:g}% of the gain, fixed before the run", "%"))
    if not controls:
        return out
    d = {r: control_distance(study, traj, r) for r in CONTROLS}
    out.append(claim(
        "the paper's controls: off-policy (teacher) rollouts keep OPD's rank dynamics closer than mixing in "
        "RLVR's advantage (alpha 0.05) does",
        [Pair("off-policy < mixed", d["opd_mix0.05"], d["opd_offpolicy"])],
        f"distance to on-policy OPD (|dSim_{K} at 20%| + |log ratio of stable-rank growth|, {traj.source}, paired "
        f"by seed): {_shown(d, 'g')}"))
    return out


def gain_share(study: StudyResult, free: str, proj: str) -> Interval:
    """The share of the gain a projection loses: mean [95% interval] over seeds."""
    return interval(list(share_lost(study, free, proj).values()))
