"""Does the student's W0 have structure at the k the analyzer uses? Stated before any verdict.

Principal angles, overlaps and the principal mask (SPEC 2, 4, 5) read W0's top-k singular subspace. That
subspace means something only where W0's spectrum has singular values standing above its noise bulk and a
gap at k; on a flat spectrum they measure mixing at an undefined boundary. Two figures per matrix:

- the signal rank of W0: singular values above the Gavish & Donoho (2014) hard threshold for an unknown noise
  level, omega(beta) * median(s), omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43, beta = min/max of
  the shape (docs/metrics.md item 12);
- the gap s_k / s_{k+1} at the analyzer's k.

Pure functions of singular values (``gd_threshold``, ``signal_rank``, ``gap``) and one summary per matrix type
(``module_spectra``). geometry.metrics may grow its own signal rank (SPEC 12, for updates); this one is the lab's,
to merge there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from geometry.concentration import gd_omega  # Gavish & Donoho's omega(beta), docs/metrics.md item 12
from geometry.selection import module_of

FLAT_GAP = 1.1  # s_k / s_{k+1} below this: the two directions are within 10%, the boundary at k is weak


def gd_threshold(s: torch.Tensor, shape: tuple[int, int]) -> float:
    """omega(beta) * median(s): singular values above it are signal, those below noise."""
    m, n = shape
    return gd_omega(min(m, n) / max(m, n)) * float(s.double().median())


def signal_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """#{s_i > gd_threshold}: 0 for a pure-noise matrix, r for a planted rank-r signal well above the noise."""
    return int((s.double() > gd_threshold(s, shape)).sum())


def gap(s: torch.Tensor, k: int) -> float:
    """s_k / s_{k+1} (1-based k, descending s): 1 on a flat spectrum."""
    return float(s[k - 1] / s[k]) if 0 < k < len(s) else float("nan")


class ModuleSpectrum(NamedTuple):
    """W0's structure for one matrix type (q_proj, ..., down_proj), over its layers."""

    module: str
    matrices: int  # how many matrices of this type (one a layer)
    shape: tuple[int, int]  # (out, in) of the first
    signal_ranks: list[int]  # per matrix, in layer order
    threshold_ratio: float  # median over matrices of gd_threshold / s_1
    gap: float  # median over matrices of s_k / s_{k+1}

    @property
    def flat(self) -> bool:
        """No signal above the noise bulk in most matrices, or no gap at k."""
        below = sum(r == 0 for r in self.signal_ranks) > len(self.signal_ranks) / 2
        return below or not self.gap >= FLAT_GAP


def module_spectra(w0: Mapping[str, torch.Tensor], k: int) -> list[ModuleSpectrum]:
    """One ModuleSpectrum per matrix type of ``w0`` (name -> 2-D weight), in first-seen order; exact SVD in
    float64."""
    by_module: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}
    for name, w in w0.items():
        s = torch.linalg.svdvals(w.double())  # (min(m, n),)
        by_module.setdefault(module_of(name), []).append((tuple(w.shape), s))
    out = []
    for module, items in by_module.items():
        ranks = [signal_rank(s, shape) for shape, s in items]
        ratios = torch.tensor([gd_threshold(s, shape) / float(s[0]) for shape, s in items])
        gaps = torch.tensor([gap(s, k) for _, s in items])
        out.append(ModuleSpectrum(module, len(items), items[0][0], ranks, float(ratios.median()),
                                  float(gaps.median())))
    return out
