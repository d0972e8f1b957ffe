"""The batched measuring engine: one group of same-shape matrices (L, m, n), every checkpoint in turn.

The base is decomposed once per group and reused for every checkpoint; per checkpoint the engine
needs W_t and the previous W_s, nothing else, so memory does not grow with the number of checkpoints.
No I/O here: ``geometry.analyze`` feeds the tensors and turns the results into rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from geometry import metrics as M
from geometry.buffers import spare
from geometry.concentration import Tally, spectral_metrics
from geometry.kernels import fro_norm, gram, mm, short_product
from geometry.linalg import SVD, exact_svd, factored_svd, gram_svd, randomized_svd, spectrum, top_from_gram
from geometry.locking import step_sims
from geometry.offline.blocked import BlockedUpdate, LongMask, Pass, overlap
from geometry.offline.config import AnalysisConfig
from geometry.symeig import all_eigenpairs, singular_values, sym_eig

N_INTRUDER = 10  # SPEC item 8: the top-10 singular vectors of W_t


class BaseFactors(NamedTuple):
    """What every checkpoint of a group is measured against, computed once."""

    W0: torch.Tensor  # (L, m, n) as stored: updates are formed from it exactly, in float64
    norm: torch.Tensor  # (L,) ||W0||_F in float64
    svd: SVD | None  # the full spectrum S (L, min(m, n)), top max(k, r) vectors U, V; Gram (checked) or exact;
    #                  None with cfg.quick (then principal and lowmag are None too)
    k: int  # principal subspace size (SPEC 2, 4)
    r: int  # rank of the reconstruction behind the principal mask (SPEC 5)
    principal: LongMask  # SPEC 5, as the update's blocks read it
    lowmag: LongMask  # SPEC 5
    left: dict[int, torch.Tensor]  # matrix index -> all of its left singular vectors, computed when first needed


class StepResult(NamedTuple):
    """One checkpoint of one group."""

    values: dict[str, torch.Tensor]  # canonical metric name -> (L,)
    UK: torch.Tensor  # (L, m, K) top-K left singular subspace of D_t, for locking
    VK: torch.Tensor  # (L, n, K)
    angles_u: torch.Tensor | None  # (L, k) principal angles in degrees, ascending; None with cfg.quick
    angles_v: torch.Tensor | None  # (L, k)
    spectrum: torch.Tensor | None  # (L, r) singular values of W_t
    methods: list[str]  # decomposition paths taken (for the notes on fallbacks)


def decompose_base(W0: torch.Tensor, cfg: AnalysisConfig, hidden: int | None = None) -> BaseFactors:
    """The base's SVD and masks; ``hidden``: the model's hidden size, which sets the default k and r.
    With ``cfg.quick`` only W0 as stored and its norm: the quick suite measures the update alone."""
    shape = tuple(W0.shape[-2:])
    k, r = cfg.principal_size(shape, hidden), cfg.mask_size(shape, hidden)
    norm = fro_norm(W0)
    if cfg.quick:
        return BaseFactors(W0, norm, None, k, r, None, None, {})
    # the Gram matrix's eigenvalues and top vectors, cheaper than an SVD; an ill-conditioned base takes the exact
    # SVD. Only the top max(k, r) vectors: intruders (SPEC 8) are mostly decided by them (metrics.intruders)
    top = max(k, r, N_INTRUDER)
    svd = gram_svd(W0, top) if cfg.update_svd != "exact" else exact_svd(W0, top)
    # W0 is kept as stored (or left in its file, offline.stored): a float64 copy of it would be a third of a
    # group's working memory, and every update is formed exactly from it (float64 = stored + the update,
    # promoted entry by entry)
    principal = LongMask(M.principal_mask(svd.U, svd.S, svd.V, r, cfg.alpha))
    return BaseFactors(W0, norm, svd, k, r, principal, LongMask(M.lowmag_mask(W0, cfg.alpha)), {})


def measure_step(base: BaseFactors, Wt: torch.Tensor, Wprev: torch.Tensor, cfg: AnalysisConfig,
                 warm: torch.Tensor | None = None,
                 update: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepResult:
    """Every per-checkpoint metric of SPEC items 1-6, 8, 11 and 12, plus the top-K update subspaces for item 7;
    with ``cfg.quick`` (a base without factors), only those of the update alone (``_quick``).

    ``warm``: the previous checkpoint's update subspace (StepResult.VK or UK, the smaller side), a start
    for this one's (subspaces of consecutive updates are close; the result is certified either way).
    ``update``: the update's factors D_t = L R, (L, m, r) and (L, r, n) (a LoRA adapter: scale B, A), when
    known; its spectrum and subspaces then come from the factors, exactly (linalg.factored_svd).
    """
    if base.svd is None:
        out, upd = _quick(base, Wt, cfg, warm, update)
        return StepResult(out, upd.U, upd.V, None, None, None, [upd.method])
    first = Wprev is base.W0  # the interval update is the cumulative one: measured once
    W0 = base.W0
    k = base.k
    m, n = W0.shape[-2:]
    Uk, Vk = base.svd.U[..., :k], base.svd.V[..., :k]
    long, short = (Uk, Vk) if m >= n else (Vk, Uk)  # the bases of W0's long and short sides
    # W_t's factors first (W_t widened to float64 a block at a time inside), then the updates, never whole: each
    # visited a block at a time from the stored matrices (geometry.offline.blocked)
    top = gram_svd(Wt, max(k, N_INTRUDER))  # vectors of W_t and its full spectrum, float64
    angle_u, angle_v = M.angle_stats(Uk, top.U[..., :k]), M.angle_stats(Vk, top.V[..., :k])
    intruders = _intruders(base, top.U[..., :N_INTRUDER], cfg)
    spectrum_t, method_t = top.S, top.method
    del top  # W_t's vectors are done with: not held through the update's passes

    with BlockedUpdate(W0, Wt) as blocks:  # its Gram matrix and blocks, buffers lent until the end of the block
        tally = Tally(base.norm, m, n)
        p = blocks.gather(cfg.abs_tol, (base.principal, base.lowmag), long, tally)
        out = _counts(p, m, n, tally)
        ov = overlap(p, short, m, n)
        upd = _decompose_update(blocks, p.gram, cfg, warm, update)
    _rank(out, upd.S, base.norm, max(m, n))
    out["angle_max_u"], out["angle_mean_u"], angles_u = angle_u
    out["angle_max_v"], out["angle_mean_v"], angles_v = angle_v
    out["nss"] = M.nss(base.svd.S, spectrum_t)

    out["overlap_2s"], out["overlap_2s_ratio"] = ov.two_sided, ov.two_sided_ratio
    out["overlap_left"], out["overlap_right"] = ov.left, ov.right
    out["overlap_left_ratio"], out["overlap_right_ratio"] = ov.left * (m / k), ov.right * (n / k)  # baselines k/m, k/n
    S_int = upd.S
    ov_int = ov
    if not first:  # the interval update d_t = W_t - W_s
        with BlockedUpdate(Wprev, Wt) as interval:
            p_int = interval.gather(basis=long)
            ov_int = overlap(p_int, short, m, n)
            S_int = _spectrum(interval, p_int.gram)
    out["overlap_2s_interval"], out["overlap_2s_interval_ratio"] = ov_int.two_sided, ov_int.two_sided_ratio
    out["overlap_left_interval"], out["overlap_right_interval"] = ov_int.left, ov_int.right

    # changed entries inside each mask over all changed (M.mask_overlap): NaN for an empty update
    out["mask_overlap_principal"], out["mask_overlap_lowmag"] = (c / p.changed for c in p.within)
    out["mask_overlap_principal_ratio"] = out["mask_overlap_principal"] / cfg.alpha  # random baseline: alpha
    out["mask_overlap_lowmag_ratio"] = out["mask_overlap_lowmag"] / cfg.alpha

    stats = M.rank_stats(S_int)
    for name in ("stable_rank", "effective_rank", "r90", "r99", "fro_norm"):
        out[f"{name}_interval"] = getattr(stats, name)
    out.update(spectral_metrics(S_int, max(m, n), "_interval"))

    out["intruders"] = intruders

    return StepResult(out, upd.U, upd.V, angles_u, angles_v, spectrum_t, [method_t, upd.method])


def _quick(base: BaseFactors, Wt: torch.Tensor, cfg: AnalysisConfig, warm: torch.Tensor | None,
           update: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], SVD]:
    """The quick suite: bf16 and absolute sparsity (SPEC 1), the update's rank metrics (SPEC 6), its norm
    relative to W0's, its top-K subspaces (SPEC 7), its sparsity ladders and energy concentration (SPEC 11) and
    signal rank (SPEC 12), from W0 and W_t as stored, the update a block at a time (geometry.offline.blocked)."""
    m, n = base.W0.shape[-2:]
    with BlockedUpdate(base.W0, Wt) as blocks:
        tally = Tally(base.norm, m, n)
        p = blocks.gather(cfg.abs_tol, tally=tally)
        out = _counts(p, m, n, tally)
        upd = _decompose_update(blocks, p.gram, cfg, warm, update)
    _rank(out, upd.S, base.norm.to(upd.S.device), max(m, n))
    return out, upd


def _counts(p: Pass, m: int, n: int, tally: Tally) -> dict[str, torch.Tensor]:
    """Parameter count and both sparsity variants (SPEC 1) from a pass's counts, and the sparsity ladders and
    top-entry energies (SPEC 11) from its tally."""
    return {"n_params": torch.full_like(p.changed, float(m * n)), "sparsity_bf16": 1.0 - p.changed / (m * n),
            "sparsity_abs": p.small / (m * n), **tally.values()}


def _decompose_update(blocks: BlockedUpdate, G: torch.Tensor, cfg: AnalysisConfig, warm: torch.Tensor | None,
                      update: tuple[torch.Tensor, torch.Tensor] | None) -> SVD:
    """The update's full spectrum and top-K subspaces (SPEC 6, 7): from its factors when known, else by the
    configured path (AnalysisConfig.update_svd): its Gram matrix G (destroyed), or the update formed whole."""
    K = min(cfg.lock_k, blocks.m, blocks.n)
    if update is not None and K <= update[0].shape[-1]:
        return factored_svd(*update, K)  # exact, D never decomposed densely
    # no factors, or K above the adapter's rank: D's top-K subspace reaches past its range
    if cfg.update_svd == "gram":
        # G is not needed after: the eigensolver may work in its place
        return top_from_gram(G, K, blocks.long, blocks.dense, tall=blocks.tall, warm=warm, seed=cfg.seed,
                             overwrite=True)
    D = blocks.dense()
    if cfg.update_svd == "exact":
        return exact_svd(D, K)
    sD = spectrum(D, small_values=False)
    return randomized_svd(D, K, oversample=cfg.oversample, n_iter=cfg.n_iter, seed=cfg.seed, check=sD)


def _spectrum(blocks: BlockedUpdate, G: torch.Tensor) -> torch.Tensor:
    """An update's singular values from its Gram matrix G, those below its resolution zero (as ``linalg.spectrum``
    without small values); the update formed whole for an exact SVD if LAPACK fails on G."""
    try:
        return singular_values(sym_eig(G, overwrite=True)[0], resolved_only=True)
    except torch.linalg.LinAlgError:
        return torch.linalg.svdvals(blocks.dense())


def _rank(out: dict[str, torch.Tensor], S: torch.Tensor, base_norm: torch.Tensor, long: int) -> None:
    """The rank metrics of an update with spectrum S (SPEC 6), its norm relative to W0's, its singular-value
    energies (SPEC 11) and signal rank (SPEC 12; ``long``: its longer side), into ``out``."""
    for name, value in zip(M.RankStats._fields, M.rank_stats(S), strict=True):
        out[name] = value
    out["rel_norm"] = out["fro_norm"] / base_norm
    out.update(spectral_metrics(S, long))


def _intruders(base: BaseFactors, Ut_top: torch.Tensor, cfg: AnalysisConfig) -> torch.Tensor:
    """SPEC 8 from the base's top vectors where they decide it; a matrix they leave undecided is counted against
    all of its base's left singular vectors (``_all_left``, once per matrix, when first needed)."""
    count = M.intruders(base.svd.U, Ut_top, cfg.intruder_threshold, complete=base.svd.U.shape[-1] >= min(
        base.W0.shape[-2:]))
    for i in count.isnan().nonzero().flatten().tolist():
        if i not in base.left:
            base.left[i] = _all_left(base, i)
        P, through_w0 = base.left[i]
        cos = mm(P.mT, short_product(_matrix(base.W0, i), Ut_top[i]) if through_w0 else Ut_top[i])  # (p, 10)
        count[i] = M.intruder_count(cos, cfg.intruder_threshold)
    return count


def _all_left(base: BaseFactors, i: int) -> tuple[torch.Tensor, bool]:
    """What gives the cosines of any vector u with every left singular vector of W0[i], in no order (a count
    takes their largest): (P, False) for cos = P^T u, or (P, True) for cos = P^T W0^T u. From the base's Gram
    matrix (its smaller side's eigenvectors and values, W0 being well-conditioned there): a wide W0's are its
    left vectors; a tall one's left vectors are W0 V / S, so u_j^T u = (v_j / s_j)^T W0^T u, without forming
    them: a full eigh of the Gram matrix costs a fraction of the SVD (benchmarks/bench_kernels.py). The Gram
    matrix is solved in its own place, the vectors scaled in theirs (``all_eigenpairs``): held with W0 and W_t,
    its working memory sets the peak of an 8B-shaped layer. A base decomposed exactly takes the exact SVD again."""
    W0 = _matrix(base.W0, i)
    if "exact" in base.svd.method:
        return exact_svd(W0).U, False
    with spare() as buffer:  # the Gram matrix in the buffer its thread keeps (geometry.buffers), solved in place
        evals, vecs = all_eigenpairs(gram(W0, buffer))
    if W0.shape[0] < W0.shape[1]:
        return vecs, False
    return vecs.div_(singular_values(evals)), True


def _matrix(W0, i: int):
    """W0[i]; of a matrix left in its file (offline.stored, one a group), the same as (m, n)."""
    return W0[i] if isinstance(W0, torch.Tensor) else W0.one()


def locking_sims(results: Sequence[StepResult]) -> list[dict[str, torch.Tensor]]:
    """Per step: Sim_K of D_t's top-K subspaces to the final D_T's and to the previous step's (SPEC 7),
    by geometry.locking.step_sims. A zero update has no subspace: a pair with one (D_t, D_T or the previous
    D_s) is NaN.
    """
    final = results[-1]
    moved = [res.values["fro_norm"] > 0 for res in results]
    sims = []
    for i, res in enumerate(results):
        prev, prev_moved = (results[i - 1], moved[i - 1]) if i > 0 else (None, None)
        u = step_sims(res.UK, final.UK, prev.UK if prev else None, moved[i], moved[-1], prev_moved)
        v = step_sims(res.VK, final.VK, prev.VK if prev else None, moved[i], moved[-1], prev_moved)
        sims.append({"sim_final_u": u.final, "sim_final_v": v.final, "sim_prev_u": u.prev, "sim_prev_v": v.prev})
    return sims


def group_size(shape: tuple[int, int], memory_mb: float, k: int | None = None) -> int:
    """How many (m, n) matrices fit in one batch within ``memory_mb``, at least one (``group_mb``)."""
    return max(1, int((memory_mb - BLOCKS_MB) // (_matrix_bytes(shape, k) / 2**20)))


# the float64 blocks a group's updates, Gram matrices and mask scores are formed in, whatever its size
# (offline.blocked, kernels.long_blocks, metrics._top_fraction_banded), with room for the allocator's slack
BLOCKS_MB = 48


def group_mb(shape: tuple[int, int], count: int = 1, k: int | None = None) -> float:
    """Working memory of measuring ``count`` (m, n) matrices together with principal size ``k`` (default: an
    eighth of the smaller side, as where that side is the hidden size), in MiB, a bound: ``BLOCKS_MB`` and per
    matrix ``_matrix_bytes``. tests/test_engine.py checks it against the peak it measures; benchmarks/bench_analyze.py
    measures the peak of an 8B-shaped layer."""
    return BLOCKS_MB + count * _matrix_bytes(shape, k) / 2**20


def _matrix_bytes(shape: tuple[int, int], k: int | None) -> int:
    """One matrix's share: W0, W_t and W_s as stored (float32 counted) and the masks (one bool while it is made,
    then both packed, a quarter of a byte an entry; while the update's pass runs, the masks packed and its
    top-entry candidates, concentration.Tally, up to 0.8 bytes an entry), 13 mn bytes; three
    r x r float64 matrices (a Gram matrix, LAPACK's copy of it, all of W0's singular vectors where intruders need
    them); W0's and W_t's top-k singular vectors, their products and the angles' working copies, 40 (m + n) k."""
    m, n = shape
    r = min(m, n)
    k = r // 8 if k is None else min(k, r)
    return 13 * m * n + 24 * r * r + 40 * (m + n) * k
