"""How concentrated an update is (docs/metrics.md items 11 and 12), as pure tensor functions.

Item 11: the share of entries within a ladder of tolerances (absolute, and relative to rms(W0)), the share of
||D||_F^2 held by the largest entries, and by the top singular values. Item 12: the update's signal rank above the
Gavish-Donoho threshold. The entry metrics are gathered a band of rows at a time (``Tally``, fed by the pass of
offline.blocked), exactly: counts, and the top entries' energy by selection, not sampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geometry import plan
from geometry.buffers import Scratch

__all__ = ["ABS_TOLS", "REL_TOLS", "TOP_ENTRIES", "TOP_SVS", "Tally", "entry_metrics", "sv_energy_top",
           "gd_omega", "signal", "spectral_metrics"]

# item 11's ladders, by name; the absolute rung 1e-5 is `sparsity_abs` (item 1's older variant, --abs-tol)
ABS_TOLS = ("1e-8", "1e-7", "1e-6", "1e-4")
REL_TOLS = ("1e-4", "1e-3", "1e-2")  # times rms(W0) = ||W0||_F / sqrt(m n)
# the top share P of entries as 1 / denominator: ceil(P N) = ceil(N / denominator), in integers
TOP_ENTRIES = (("0.1pct", 1000), ("1pct", 100), ("5pct", 20))
TOP_SVS = (1, 4, 16, 64)  # sv_energy_top_J, J capped at the rank

SAMPLE = 4096  # candidates sampled to place the bound that drops the others (``_above``)


def _top_counts(entries: int) -> list[int]:
    """ceil(P N) for each share of TOP_ENTRIES, at least 1."""
    return [max(1, -(-entries // den)) for _, den in TOP_ENTRIES]


class Tally:
    """Item 11's entry metrics of a group of updates (L, m, n), gathered a band of their entries at a time
    (``add``), then read by ``values``.

    Counts at every tolerance, ||D||_F^2, and for the top-entry energies the candidates: every entry seen at or
    above a bound that at least ceil(N / 20) seen entries reach, so the largest that many seen are among them.
    The bound starts at 0 and rises when the candidates pass twice that number (``_above``): a matrix holds at
    most 2 ceil(N / 20) + a band of float64 candidates, 0.8 bytes an entry. Bands of any shape, order or device;
    the values do not depend on how the entries are cut into bands (tested).
    """

    def __init__(self, w0_norm: torch.Tensor, m: int, n: int):
        """``w0_norm``: (L,) ||W0||_F of each matrix, for the relative tolerances."""
        self.entries = m * n
        rms = (w0_norm.double().cpu() / math.sqrt(self.entries)).tolist()
        # each matrix's tolerances, absolute then relative: (L, len(ABS_TOLS) + len(REL_TOLS))
        self.tols = torch.tensor([[float(t) for t in ABS_TOLS] + [float(t) * r for t in REL_TOLS] for r in rms],
                                 dtype=torch.float64)
        L = len(rms)
        self.small = torch.zeros_like(self.tols)
        self.energy = torch.zeros(L, dtype=torch.float64)
        self.keep = max(_top_counts(self.entries))
        self.bound = [0.0] * L  # the entries above 0, then every entry at or above it, are candidates
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.held = [0] * L
        self._abs = Scratch()
        self._gen = torch.Generator().manual_seed(0)

    def add(self, d: torch.Tensor) -> None:
        """Count and keep the candidates of a band d (L, b, c) of the updates, float64."""
        if not d.is_contiguous() and d.mT.is_contiguous():
            d = d.mT  # entries in any order: the stored one, without a copy in another
        a = self._abs.take(tuple(d.shape), torch.float64, d.device)  # (L, b, c) |d|
        torch.abs(d, out=a)
        flat = a.flatten(1)  # (L, b c)
        self.energy += torch.linalg.vector_norm(flat, dim=1).cpu().square()  # 5x vecdot's speed on the CPU
        self.small += _count_at_most(flat, self.tols)
        for i in range(a.shape[0]):
            part = _at_least(flat[i], self.bound[i], strict=self.bound[i] == 0)
            self.parts[i].append(part)
            self.held[i] += part.numel()
            if self.held[i] >= 2 * self.keep:
                self.bound[i], self.parts[i] = _above(self.parts[i], self.keep, self._gen)
                self.held[i] = sum(p.numel() for p in self.parts[i])

    def values(self) -> dict[str, torch.Tensor]:
        """Metric name -> (L,) float64: `sparsity_abs_T`, `sparsity_rel_T`, `energy_top_P`; NaN energy shares
        for a zero update."""
        N = self.entries
        out = {f"sparsity_abs_{t}": self.small[:, j] / N for j, t in enumerate(ABS_TOLS)}
        out.update({f"sparsity_rel_{t}": self.small[:, len(ABS_TOLS) + j] / N for j, t in enumerate(REL_TOLS)})
        tops = torch.stack([_top_sums(parts, _top_counts(N), self._gen) for parts in self.parts])
        for j, (name, _) in enumerate(TOP_ENTRIES):
            out[f"energy_top_{name}"] = tops[:, j] / self.energy  # (L,)
        return out


# On the CPU by numpy, whose compares and selections are 3-5x torch's there (measured, 128K float64 entries:
# a compare and count 0.32 against 1.3-1.6 ns an entry, a selection of 10% 1.5 against 4.7)

def _count_at_most(flat: torch.Tensor, tols: torch.Tensor) -> torch.Tensor:
    """(L, t) float64: entries of each row of flat (L, N) at most each of that row's tolerances tols (L, t)."""
    if plan.gpu(flat):
        return (flat[:, :, None] <= tols.to(flat.device)[:, None, :]).sum(1).double().cpu()
    x, mask = flat.numpy(), np.empty(flat.shape[1], dtype=bool)
    return torch.tensor([[np.count_nonzero(np.less_equal(row, t, out=mask)) for t in ts]
                         for row, ts in zip(x, tols.tolist(), strict=True)], dtype=torch.float64)


def _at_least(x: torch.Tensor, t: float | torch.Tensor, strict: bool = False) -> torch.Tensor:
    """x[x >= t] (``strict``: x[x > t]) of a 1-D x, a new tensor. On the CPU a mask's positions are taken where
    more than an eighth of it is set: numpy's boolean index mispredicts there (measured, 128K float64 entries, half
    set at random: 9.4 ns an entry against 1.8; a twentieth set: 1.9 against 2.6)."""
    if plan.gpu(x):
        return x[x > t] if strict else x[x >= t]
    xn = x.numpy()
    mask = xn > float(t) if strict else xn >= float(t)
    count = np.count_nonzero(mask)
    if count == mask.size:
        return torch.from_numpy(xn.copy())
    if count > mask.size // 8:
        return torch.from_numpy(xn.take(np.flatnonzero(mask)))
    return torch.from_numpy(xn[mask])


def _count_at_least(x: torch.Tensor, t: float) -> int:
    """Entries of a 1-D x at least t."""
    if plan.gpu(x):
        return int((x >= t).sum())
    return int(np.count_nonzero(x.numpy() >= t))


def _above(parts: list[torch.Tensor], k: int, gen: torch.Generator) -> tuple[float, list[torch.Tensor]]:
    """(t, each part's entries at least t) for a bound t that at least k entries of the 1-D parts reach (k at most
    their number), near their k-th largest: a seeded sample places it about 5 standard deviations of its rank
    below, a count checks it (a compare and a selection of each part, a fifth of a full selection's cost); else
    the k-th largest itself (torch.kthvalue of the parts joined). ``parts`` is emptied, each let go once
    selected: no copy of them all is held."""
    n = sum(p.numel() for p in parts)
    if n > 4 * SAMPLE:
        s = torch.cat([p[torch.randint(p.numel(), (-(-SAMPLE * p.numel() // n),), generator=gen).to(p.device)]
                       for p in parts if p.numel()]).sort().values
        at = math.floor((1 - k / n) * s.numel() - 5 * math.sqrt(s.numel()))
        if at > 0 and sum(_count_at_least(p, float(s[at])) for p in parts) >= k:
            t = float(s[at])
            return t, [_at_least(parts.pop(), t) for _ in range(len(parts))]
    whole = torch.cat(parts)
    parts.clear()
    t = float(whole.kthvalue(n - k + 1).values)
    return t, [_at_least(whole, t)]


def _top_sums(parts: list[torch.Tensor], ks: list[int], gen: torch.Generator) -> torch.Tensor:
    """(len(ks),): the sum of squares of the k largest entries of the 1-D parts (nonnegative; those they lack are
    zeros) for each k, exactly: narrowed by ``_above`` to the largest max(ks), then one selection for every k (on
    the CPU numpy's partition at all of them at once, elsewhere a sorted torch.topk). ``parts`` is emptied."""
    kmax = max(ks)
    if sum(p.numel() for p in parts) > kmax:
        parts = _above(parts, kmax, gen)[1]
    c = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    n = c.numel()
    if not plan.gpu(c):
        x = c.numpy()
        cuts = sorted({n - k for k in ks if k < n})
        if cuts:
            x = np.partition(x, cuts)  # x[n - k:] holds the k largest, for each k
        return torch.tensor([float(np.square(x[max(0, n - k):]).sum()) for k in ks], dtype=torch.float64)
    top = torch.topk(c, min(kmax, n)).values.square()  # descending
    return torch.stack([top[:k].sum() for k in ks]).cpu()


def entry_metrics(w0: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """Item 11's entry metrics of whole updates d (..., m, n), W0 w0 as stored (the norm behind rms(W0)): one
    ``Tally`` band."""
    m, n = d.shape[-2:]
    batch = d.shape[:-2]
    tally = Tally(torch.linalg.matrix_norm(w0.double()).reshape(-1), m, n)
    tally.add(d.double().reshape(-1, m, n))
    return {name: v.view(batch) for name, v in tally.values().items()}


# --- spectrum ----------------------------------------------------------------------------------

def sv_energy_top(s: torch.Tensor, j: int) -> torch.Tensor:
    """Share of ||D||_F^2 in the top j singular values (all of them when j passes the rank), from D's spectrum
    s (..., r), descending; NaN for a zero update."""
    e = s.double().square()
    return e[..., :j].sum(-1) / e.sum(-1)


def gd_omega(beta: float) -> float:
    """omega(beta) of Gavish & Donoho (2014), "The optimal hard threshold for singular values is 4/sqrt(3)",
    IEEE Trans. Inf. Theory 60(8): their cubic approximation of the optimal threshold coefficient with unknown
    noise, beta = min(m, n) / max(m, n) in (0, 1]."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def signal(s: torch.Tensor, long: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal_rank, signal_energy) of an update from its full spectrum s (..., r = min(m, n)), descending, and
    its longer side ``long`` = max(m, n): the singular values above omega(beta) median(s) (Gavish & Donoho 2014,
    unknown noise level) and their share of ||D||_F^2. The median runs over all r values, zeros included (numpy's
    median: the mean of the two middle ones for even r): an update of rank below r / 2 has median 0, and its
    signal rank is its rank. Both NaN for a zero update."""
    s = s.double()
    r = s.shape[-1]
    median = (s[..., (r - 1) // 2] + s[..., r // 2]) / 2  # the middle of a sorted spectrum, either order
    above = s > (gd_omega(r / long) * median)[..., None]
    e = s.square()
    total = e.sum(-1)
    nan = torch.full_like(total, math.nan)
    rank = torch.where(total > 0, above.sum(-1).double(), nan)
    return rank, torch.where(total > 0, (e * above).sum(-1) / total, nan)


def spectral_metrics(s: torch.Tensor, long: int, suffix: str = "") -> dict[str, torch.Tensor]:
    """Items 11 (``sv_energy_top_J``) and 12 (``signal_rank``, ``signal_energy``) of an update's spectrum s, each
    name followed by ``suffix`` (``"_interval"`` for d_t: signal metrics only)."""
    out = {} if suffix else {f"sv_energy_top_{j}": sv_energy_top(s, j) for j in TOP_SVS}
    out[f"signal_rank{suffix}"], out[f"signal_energy{suffix}"] = signal(s, long)
    return out
