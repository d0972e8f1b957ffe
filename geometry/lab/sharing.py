"""Do seeds of one regime share more changed entries than two regimes do? (docs/metrics.md item 10)

Read from the analysis's pairs of runs (geometry.offline.pairs) at their final steps. Two seeds of one regime
differ in data order and sampling; two regimes' runs of different seeds differ in that and in the regime, so
the contrast is "within a regime" against "across two regimes, seeds differing". The measure is the changed
entries shared over those shared by independent masks of the same densities (``pair_mask_overlap_ratio``):
the Jaccard alone grows with density, and the regimes' densities differ by an order of magnitude.
The pairs of seeds are not independent (a run takes part in several), so the table describes; no test decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from geometry.offline.markdown import fmt, table
from geometry.offline.pairs import Pairs

RATIO, JACCARD = "pair_mask_overlap_ratio", "pair_mask_jaccard"


class Sharing(NamedTuple):
    """Two regimes (the same one twice: its seeds) and their pairs' mean values at the final steps."""

    a: str
    b: str
    pairs: int
    ratio: float  # mean pair_mask_overlap_ratio
    jaccard: float  # mean pair_mask_jaccard


def _split(run: str) -> tuple[str, str]:
    name, _, seed = run.partition("/")  # geometry.lab.study.label: "name/sSEED"
    return name, seed


def sharing(pairs: Pairs, regimes: Sequence[str]) -> list[Sharing]:
    """Each regime against itself (pairs of its seeds), then each two regimes (pairs of different seeds), in the
    order of ``regimes``; combinations without pairs are left out."""
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for s in pairs.summaries:
        (a, seed_a), (b, seed_b) = _split(s.run_a), _split(s.run_b)
        if a not in regimes or b not in regimes or seed_a == seed_b:
            continue
        key = tuple(sorted((a, b), key=list(regimes).index))
        cells.setdefault(key, []).append((s.final(RATIO), s.final(JACCARD)))
    order = [(a, a) for a in regimes] + [(a, b) for i, a in enumerate(regimes) for b in regimes[i + 1:]]
    return [Sharing(a, b, len(cells[(a, b)]), *(_mean(col) for col in zip(*cells[(a, b)], strict=True)))
            for a, b in order if (a, b) in cells]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def sharing_lines(pairs: Pairs, regimes: Sequence[str]) -> list[str]:
    """The report's section: the table and, per regime, whether its seeds share more than it shares with each
    other regime ('' lines when fewer than two seeds of any regime were compared)."""
    rows = sharing(pairs, regimes)
    within = {r.a: r for r in rows if r.a == r.b}
    if not within:
        return []
    answers = []
    for name, w in within.items():
        others = [r for r in rows if r.a != r.b and name in (r.a, r.b)]
        if not others:
            continue
        more = [r for r in others if w.ratio > r.ratio]
        verdict = "yes" if len(more) == len(others) else "no" if not more else "partly"
        answers.append(f"- **{name}**: {verdict}: its seeds share {fmt(w.ratio)}x chance; with "
                       + ", ".join(f"{r.b if r.a == name else r.a} {fmt(r.ratio)}x" for r in others) + ".")
    missing = [r for r in regimes if r not in within]
    if missing:  # runs are compared only where they start from the same model (docs/metrics.md item 10)
        answers.append(f"Not compared: {', '.join(missing)}, whose runs of different seeds start from different "
                       "models (each seed's own starting checkpoint), so their changed entries are not comparable.")
    return ["## Do seeds of one regime share more changed entries than two regimes do?", "",
            "Changed entries (bf16) shared by two runs at their final steps over those two independent masks of "
            "the same densities would share (1: chance; docs/metrics.md item 10), and their Jaccard; mean over "
            "the pairs of runs: two seeds of one regime, or two regimes' runs of different seeds. Descriptive: "
            "a run takes part in several pairs, so no test decides.", "",
            table(["runs", "pairs", "shared / chance", "Jaccard"],
                  [[f"{r.a} seeds" if r.a == r.b else f"{r.a} vs {r.b}", r.pairs, fmt(r.ratio), fmt(r.jaccard)]
                   for r in rows]), "", *answers, ""]
