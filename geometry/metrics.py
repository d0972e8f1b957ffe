"""The metrics of SPEC.md items 1-8 as pure tensor functions, batched over leading dimensions.

Inputs are weight tensors ``(..., m, n)`` in any float dtype, or factors from ``geometry.linalg``.
Outputs are float64 tensors of shape ``(...)``: one value per matrix. No I/O; where the CPU and the GPU want
different kernels, ``geometry.plan`` decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from geometry import plan
from geometry.buffers import spare
from geometry.kernels import mm, row_bands
from geometry.subspaces import degrees, principal_angles, subspace_sim

__all__ = [
    "bf16_bits", "changed_mask", "fraction", "sparsity_bf16", "sparsity_abs", "count_small", "angle_stats", "nss",
    "Overlap", "overlap", "principal_mask", "lowmag_mask", "mask_overlap", "RankStats", "rank_stats", "intruders",
    "intruder_count", "subspace_sim", "HILL_K",
]

HILL_K = 10  # SPEC item 6: Hill tail exponent over the top 10 singular values
HILL_FLOOR = 1e-6  # s_{k_h} / s_1 below this is numerical noise (float64 Gram spectra resolve ~1e-8)


# --- 1. bf16 update sparsity -------------------------------------------------------------------

def bf16_bits(w: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int16, same shape) of w, rounded to nearest even."""
    return w.to(torch.bfloat16).view(torch.int16)


def changed_mask(w0: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Entries whose bf16 bit pattern changed (SPEC item 1; Mukherjee et al. 2025). Bool (..., m, n)."""
    return bf16_bits(w0) != bf16_bits(wt)


def count(mask: torch.Tensor, dim: int | tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """True entries of a bool tensor along ``dim`` (per matrix by default), float64. On the CPU plan by numpy's
    count_nonzero, many times faster than torch's count there; on the GPU plan by torch's."""
    if not plan.gpu(mask):
        return torch.from_numpy(np.asarray(np.count_nonzero(mask.numpy(), axis=dim), dtype=np.float64))
    return mask.count_nonzero(dim).double()


def fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of True entries of a bool (..., m, n), float64 (...); counted, not summed as a float copy."""
    m, n = mask.shape[-2:]
    return count(mask) / (m * n)


def sparsity_bf16(w0: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Fraction of entries unchanged at bf16 precision, bit for bit."""
    return 1.0 - fraction(changed_mask(w0, wt))


def sparsity_abs(w0: torch.Tensor, wt: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Older papers' variant: fraction of entries with |w_t - w_0| <= tol (computed in float64)."""
    return fraction((wt.double() - w0.double()).abs() <= tol)


def count_small(d: torch.Tensor, tol: float) -> torch.Tensor:
    """Entries of a float64 update d (..., m, n) with |d| <= tol, per matrix (the counts behind
    ``sparsity_abs``): no |d| copy, and its bool masks a band of rows at a time (whole, three of them are 150 MB
    for one 12288 x 4096 matrix)."""
    m, n = d.shape[-2:]
    bands = row_bands(m, 8 * n * max(1, math.prod(d.shape[:-2])))
    return sum(count((d[..., b, :] <= tol) & (d[..., b, :] >= -tol)) for b in bands)


# --- 2. principal angles -----------------------------------------------------------------------

def angle_stats(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, mean, full ascending curve) of the principal angles in degrees between span(A), span(B)."""
    theta = degrees(principal_angles(A, B))  # (..., k)
    return theta.amax(-1), theta.mean(-1), theta


# --- 3. normalised spectral shift --------------------------------------------------------------

def nss(s0: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
    """||s(W_t) - s(W_0)||_2 / ||s(W_0)||_2 over the full spectra, in float64 (SPEC item 3)."""
    s0, st = s0.double(), st.double()
    return torch.linalg.vector_norm(st - s0, dim=-1) / torch.linalg.vector_norm(s0, dim=-1)


# --- 4. principal-direction overlap ------------------------------------------------------------

class Overlap(NamedTuple):
    """Fractions of ||D||_F^2 inside the top-k principal subspaces of W0 (SPEC item 4), each (...)."""

    two_sided: torch.Tensor  # ||U_k^T D V_k||_F^2 / ||D||_F^2
    two_sided_ratio: torch.Tensor  # two_sided / (k^2 / (m n)), 1 for a random update
    left: torch.Tensor  # ||U_k^T D||_F^2 / ||D||_F^2, random baseline k / m
    right: torch.Tensor  # ||D V_k||_F^2 / ||D||_F^2, random baseline k / n


def overlap(d: torch.Tensor, Uk: torch.Tensor, Vk: torch.Tensor) -> Overlap:
    """Overlap of an update d (..., m, n) with base factors Uk (..., m, k), Vk (..., n, k)."""
    d = d.double()
    m, n = d.shape[-2:]
    k = Uk.shape[-1]
    total = torch.linalg.matrix_norm(d).square()  # (...) ||d||_F^2 without a squared copy of d
    left = mm(Uk.mT, d)  # (..., k, n)
    two = mm(left, Vk).square().sum((-2, -1)) / total
    baseline = k * k / (m * n)
    return Overlap(two, two / baseline, left.square().sum((-2, -1)) / total,
                   mm(d, Vk).square().sum((-2, -1)) / total)


# --- 5. mask localisation ----------------------------------------------------------------------

def _top_fraction(score: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask of the ceil(alpha * mn) largest entries of score (..., m, n), ties broken by position
    (the earlier entry wins): exactly the first ``count`` of a stable descending sort.

    A selection, not a sort: the count-th largest value by ``_kth_largest`` (O(mn)), every entry above it,
    and of the entries equal to it the first ones in position order (bf16 weights tie often). NaN scores
    have no order a selection can share with a sort: they take the sort (``_top_fraction_sorted``).
    """
    flat = score.flatten(-2)  # (..., mn)
    total = flat.shape[-1]
    # relative slack: alpha * mn that should be an integer (0.07 * 200) must not round up past it
    count = math.ceil(alpha * total * (1 - 1e-12))
    if count <= 0 or flat.isnan().any():
        return _top_fraction_sorted(score, count)
    thr = _kth_largest(flat, count)  # (..., 1)
    above = flat > thr
    ties = flat == thr
    need = count - _count_last(above)  # (..., 1) how many tied entries still fit, by position
    if bool((_count_last(ties) == need).all()):  # every tie fits (no tie but the threshold: the rule)
        return (above | ties).view(score.shape)
    mask = above | (ties & (ties.cumsum(-1) <= need))
    return mask.view(score.shape)


def _count_last(mask: torch.Tensor) -> torch.Tensor:
    """True entries along the last dimension, (..., 1)."""
    return count(mask, -1)[..., None]


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry along the last dimension, (..., 1). On the CPU plan by ``_select`` (numpy), on the
    GPU plan torch's kthvalue."""
    total = flat.shape[-1]
    if plan.gpu(flat):
        return flat.kthvalue(total - k + 1, dim=-1, keepdim=True).values
    rows = flat.numpy().reshape(-1, total)
    return torch.from_numpy(np.array([_select(row, k) for row in rows], dtype=rows.dtype)).view(*flat.shape[:-1], 1)


SELECT_SAMPLE = 16384  # entries sampled to bracket the k-th largest


def _select(a: np.ndarray, k: int):
    """The k-th largest entry of a 1-D array, exactly: ``_bracketed``, else introselect on the whole array."""
    n = a.size
    found = _bracketed(a, k) if n > 4 * SELECT_SAMPLE else None
    return np.partition(a, n - k)[n - k] if found is None else found


def _bracketed(a: np.ndarray, k: int):
    """The k-th largest entry of a 1-D array, or None. A seeded sample puts two bounds around it; only the
    entries between them are partitioned (introselect), the others counted: faster than partitioning all
    (benchmarks/README.md, "Measurements behind the engine's choices"). None when the bounds miss it (a sample
    unlike the whole array)."""
    n = a.size
    lo, hi = _bounds(a[np.random.default_rng(0).integers(0, n, SELECT_SAMPLE)], k, n)
    return _within(np.count_nonzero(a > hi), a[(a >= lo) & (a <= hi)], k)


def _bounds(sample: np.ndarray, k: int, n: int) -> tuple:
    """Two values around the k-th largest of n entries, from a uniform sample of them: ~10 standard deviations
    of its rank in the sample apart."""
    sample = np.sort(sample)
    size = sample.size
    at, margin = (1 - k / n) * size, 5 * math.sqrt(size)
    return sample[max(0, math.floor(at - margin))], sample[min(size - 1, math.ceil(at + margin))]


def _within(above: int, between: np.ndarray, k: int):
    """The k-th largest of an array from the count of its entries above two bounds and those between them;
    None when the bounds miss it."""
    if above >= k or above + between.size < k:
        return None
    j = k - above  # the k-th largest of the array is the j-th largest of those between the bounds
    return np.partition(between, between.size - j)[between.size - j]


def _top_fraction_banded(score: Callable[[slice], torch.Tensor], m: int, n: int, alpha: float) -> torch.Tensor:
    """``_top_fraction`` of a score (..., m, n) given a band of rows at a time (``score(rows)`` -> (..., b, n)),
    the same mask, bit for bit, without the whole score: on the CPU plan, bands of ``kernels.row_bands``, three passes
    (a seeded sample; the counts above two bounds from it and the entries between them, whose selection gives
    the threshold; the mask, ties taken in position order as a stable sort takes them). A score whose bounds
    miss, or that holds NaN, is formed whole for ``_top_fraction`` (a 12288 x 4096 score is 400 MB). A band
    ``score`` gives may be valid only until its next call (one buffer, reused: ``geometry.buffers.Scratch``)."""
    first = score(slice(0, 1))
    batch, batched = first.shape[:-2], plan.gpu(first)
    dtype = None if batched else first.numpy().dtype
    L = math.prod(batch)
    bands = row_bands(m, 8 * n * max(1, L))

    def whole() -> torch.Tensor:
        return torch.cat([score(rows).clone() for rows in bands], -2)

    if len(bands) == 1:
        return _top_fraction(score(bands[0]), alpha)
    if batched:  # the GPU plan: one selection over the whole score
        return _top_fraction(whole(), alpha)
    total = m * n
    count = math.ceil(alpha * total * (1 - 1e-12))  # as _top_fraction counts
    if count <= 0:
        return torch.zeros(*batch, m, n, dtype=torch.bool)

    def visit():
        for rows in bands:
            yield rows, score(rows).reshape(L, -1, n).numpy()

    pos = np.sort(np.random.default_rng(0).integers(0, total, SELECT_SAMPLE))  # flat positions, row-major
    sample = np.empty((L, SELECT_SAMPLE), dtype=dtype)
    for rows, s in visit():
        if np.isnan(s).any():
            return _top_fraction(whole(), alpha)
        a, b = np.searchsorted(pos, (rows.start * n, rows.stop * n))
        sample[:, a:b] = s.reshape(L, -1)[:, pos[a:b] - rows.start * n]
    lohi = [_bounds(sample[i], count, total) for i in range(L)]
    above, between = np.zeros(L, dtype=np.int64), [[] for _ in range(L)]
    for _, s in visit():
        for i, (lo, hi) in enumerate(lohi):
            above[i] += np.count_nonzero(s[i] > hi)
            between[i].append(s[i][(s[i] >= lo) & (s[i] <= hi)])
    between = [np.concatenate(parts) for parts in between]
    thr = [_within(int(above[i]), between[i], count) for i in range(L)]
    if any(t is None for t in thr):
        return _top_fraction(whole(), alpha)
    # ties at the threshold that fit: count less the entries above it
    room = [count - int(above[i]) - np.count_nonzero(between[i] > thr[i]) for i in range(L)]
    mask = np.empty((L, m, n), dtype=bool)
    for rows, s in visit():
        for i in range(L):
            np.greater(s[i], thr[i], out=mask[i, rows])
            if room[i] > 0:
                ties = np.flatnonzero(s[i] == thr[i])[: room[i]]
                mask[i, rows].reshape(-1)[ties] = True  # a band of rows of a C-order array: a view
                room[i] -= ties.size
    return torch.from_numpy(mask).view(*batch, m, n)


def _top_fraction_sorted(score: torch.Tensor, count: int) -> torch.Tensor:
    """The reference for ``_top_fraction``: a stable descending sort, the same on every device and version."""
    flat = score.flatten(-2)
    idx = flat.argsort(dim=-1, descending=True, stable=True)[..., :count]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view(score.shape)


def principal_mask(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int, alpha: float = 0.5) -> torch.Tensor:
    """Top-alpha fraction of entries of |rank-r reconstruction of W0| (SPEC item 5), the reconstruction a band of
    rows at a time (``_top_fraction_banded``)."""
    left, right = U[..., :r] * S[..., None, :r], V[..., :r].mT
    with spare() as scratch:

        def score(rows: slice) -> torch.Tensor:
            return mm(left[..., rows, :], right, scratch).abs_()  # (..., b, n), in place

        return _top_fraction_banded(score, U.shape[-2], V.shape[-2], alpha)


def lowmag_mask(w0: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Bottom-alpha fraction of entries of |W0| (SPEC item 5), scored a band of rows at a time."""

    with spare() as scratch:

        def score(rows: slice) -> torch.Tensor:
            band = w0[..., rows, :] if isinstance(w0, torch.Tensor) else w0.rows(rows)  # or read: offline.stored
            return scratch.take(band.shape, torch.float32, band.device).copy_(band).abs_().neg_()

        return _top_fraction_banded(score, *w0.shape[-2:], alpha)


def mask_overlap(update: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|reference ∩ update| / |update| (random baseline: reference's fraction); NaN for an empty update."""
    # counts, not a float64 copy of each mask (L m n x 8 bytes apiece)
    return count(update & reference) / count(update)


# --- 6. rank of the update ---------------------------------------------------------------------

class RankStats(NamedTuple):
    """Rank summaries of a spectrum (SPEC item 6), each (...); NaN for a zero matrix except fro_norm."""

    stable_rank: torch.Tensor  # ||D||_F^2 / s1^2
    effective_rank: torch.Tensor  # exp(H(p)), p_i = s_i / sum_j s_j (Roy & Vetterli 2007)
    r90: torch.Tensor  # smallest r with sum_{i<=r} s_i^2 >= 0.9 ||D||_F^2
    r99: torch.Tensor
    fro_norm: torch.Tensor  # ||D||_F
    hill_alpha: torch.Tensor  # [mean_{i<k_h} log(s_i / s_{k_h})]^-1, k_h = 10


def rank_stats(s: torch.Tensor) -> RankStats:
    """Rank summaries from a full spectrum s (..., r), descending."""
    s = s.double()
    energy = s.square()
    total = energy.sum(-1)
    nan = torch.full_like(total, math.nan)
    zero = total <= 0
    p = s / s.sum(-1, keepdim=True)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    frac = energy.cumsum(-1) / total[..., None]

    def energy_rank(level: float) -> torch.Tensor:
        # 1e-12 slack: a cumulative sum that should reach the level exactly must not miss it by rounding
        return (frac < level - 1e-12).sum(-1).double() + 1

    kh = min(HILL_K, s.shape[-1])
    logs = (s[..., : kh - 1] / s[..., kh - 1 : kh]).log()  # (..., kh - 1)
    hill = 1.0 / logs.mean(-1) if kh > 1 else nan
    # an update of rank < k_h has s_{k_h} at the noise floor: no tail to measure
    hill = torch.where(s[..., kh - 1] > HILL_FLOOR * s[..., 0], hill, nan)
    return RankStats(
        torch.where(zero, nan, total / energy[..., 0]),
        torch.where(zero, nan, entropy.exp()),
        torch.where(zero, nan, energy_rank(0.9)),
        torch.where(zero, nan, energy_rank(0.99)),
        total.sqrt(),
        torch.where(zero, nan, hill),
    )


# --- 8. intruder dimensions --------------------------------------------------------------------

def intruder_count(cos: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """SPEC 8 from the cosines (..., p, 10) of W_t's top-10 left singular vectors with all p of W0's."""
    return (cos.abs().amax(-2) < threshold).double().sum(-1)


def intruders(U0: torch.Tensor, Ut_top: torch.Tensor, threshold: float = 0.5, *, complete: bool = True
              ) -> torch.Tensor:
    """Count of the columns of Ut_top (..., m, 10) whose largest |cos| with any column of U0 (..., m, p)
    is below threshold (Shuttleworth et al. 2024, 'intruder dimensions').

    ``complete``: U0 holds every left singular vector of W0. Otherwise only its top p, and a direction is
    decided from them when it can be: its largest |cos| among them reaches the threshold (not an intruder),
    or the energy they leave, 1 - sum cos^2, which bounds the cos^2 with every other (orthonormal) vector, is
    below threshold^2 (an intruder). A matrix with an undecided direction is NaN: count it against all of U0.
    """
    cos = mm(U0.double().mT, Ut_top.double())  # (..., p, 10)
    count = intruder_count(cos, threshold)
    if complete:
        return count
    best = cos.abs().amax(-2)  # (..., 10)
    rest = 1.0 - cos.square().sum(-2)  # (..., 10) energy outside span(U0's top p)
    # 1e-9: rounding in the sum of squares must not decide a direction whose rest sits at threshold^2
    decided = (best >= threshold) | (rest < threshold * threshold - 1e-9)
    return torch.where(decided.all(-1), count, torch.full_like(count, math.nan))
