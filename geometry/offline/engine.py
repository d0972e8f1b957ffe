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
from geometry.linalg import (
    SVD,
    exact_svd,
    factored_svd,
    gram,
    gram_svd,
    gram_top,
    mm,
    randomized_svd,
    singular_values,
    spectrum,
    sym_eig,
)
from geometry.locking import step_sims
from geometry.offline.blocked import BlockedUpdate, update_svd
from geometry.offline.config import AnalysisConfig

N_INTRUDER = 10  # SPEC item 8: the top-10 singular vectors of W_t


class BaseFactors(NamedTuple):
    """What every checkpoint of a group is measured against, computed once."""

    W0: torch.Tensor  # (L, m, n) as stored: updates are formed from it exactly, in float64
    bits: torch.Tensor | None  # (L, m, n) int16: W0's bf16 bit patterns, for the update mask (SPEC 1)
    norm: torch.Tensor  # (L,) ||W0||_F in float64
    svd: SVD | None  # the full spectrum S (L, min(m, n)), top max(k, r) vectors U, V; Gram (checked) or exact;
    #                  None with cfg.quick (then principal and lowmag are None too)
    k: int  # principal subspace size (SPEC 2, 4)
    r: int  # rank of the reconstruction behind the principal mask (SPEC 5)
    principal: torch.Tensor  # (L, m, n) bool, SPEC 5
    lowmag: torch.Tensor  # (L, m, n) bool, SPEC 5
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
    if cfg.quick:
        norm = torch.stack([torch.linalg.matrix_norm(w.double()) for w in W0])  # one float64 copy at a time
        return BaseFactors(W0, None, norm, None, k, r, None, None, {})
    # the Gram matrix's eigenvalues and top vectors, cheaper than an SVD; an ill-conditioned base takes the exact
    # SVD. Only the top max(k, r) vectors: intruders (SPEC 8) are mostly decided by them (metrics.intruders)
    top = max(k, r, N_INTRUDER)
    svd = gram_svd(W0, top) if cfg.update_svd != "exact" else exact_svd(W0, top)
    # W0 is kept as stored: a float64 copy of it would be a third of a group's working memory, and every
    # update is formed exactly from it (float64 = stored + the update, promoted entry by entry)
    return BaseFactors(W0, M.bf16_bits(W0), torch.linalg.matrix_norm(W0.double()), svd, k, r,
                       M.principal_mask(svd.U, svd.S, svd.V, r, cfg.alpha), M.lowmag_mask(W0, cfg.alpha), {})


def measure_step(base: BaseFactors, Wt: torch.Tensor, Wprev: torch.Tensor, cfg: AnalysisConfig,
                 warm: torch.Tensor | None = None,
                 update: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepResult:
    """Every per-checkpoint metric of SPEC items 1-6 and 8, plus the top-K update subspaces for item 7;
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
    # W_t's factors first (W_t widened to float64 a block at a time inside), then the update: at most one whole
    # float64 matrix (D, or later d) is alive at a time
    top = gram_svd(Wt, max(k, N_INTRUDER))  # vectors of W_t and its full spectrum, float64
    angle_u, angle_v = M.angle_stats(Uk, top.U[..., :k]), M.angle_stats(Vk, top.V[..., :k])
    intruders = _intruders(base, top.U[..., :N_INTRUDER], cfg)

    D = _difference(Wt, W0)
    out = _counts(W0, D, cfg)
    changed = base.bits != M.bf16_bits(Wt)  # M.changed_mask with W0's bits computed once
    out["sparsity_bf16"] = 1.0 - M.fraction(changed)
    upd = _decompose_update(D, cfg, warm, update)
    _rank(out, upd.S, base.norm)
    out["angle_max_u"], out["angle_mean_u"], angles_u = angle_u
    out["angle_max_v"], out["angle_mean_v"], angles_v = angle_v
    out["nss"] = M.nss(base.svd.S, top.S)

    ov = M.overlap(D, Uk, Vk)
    out["overlap_2s"], out["overlap_2s_ratio"] = ov.two_sided, ov.two_sided_ratio
    out["overlap_left"], out["overlap_right"] = ov.left, ov.right
    out["overlap_left_ratio"], out["overlap_right_ratio"] = ov.left * (m / k), ov.right * (n / k)  # baselines k/m, k/n
    if not first:  # the interval update, in the place of the cumulative one (whose last use was above)
        del D
        D = _difference(Wt, Wprev)
    d = D
    ov_int = ov if first else M.overlap(d, Uk, Vk)
    out["overlap_2s_interval"], out["overlap_2s_interval_ratio"] = ov_int.two_sided, ov_int.two_sided_ratio
    out["overlap_left_interval"], out["overlap_right_interval"] = ov_int.left, ov_int.right

    out["mask_overlap_principal"] = M.mask_overlap(changed, base.principal)
    out["mask_overlap_lowmag"] = M.mask_overlap(changed, base.lowmag)
    out["mask_overlap_principal_ratio"] = out["mask_overlap_principal"] / cfg.alpha  # random baseline: alpha
    out["mask_overlap_lowmag_ratio"] = out["mask_overlap_lowmag"] / cfg.alpha

    interval = M.rank_stats(upd.S if first else spectrum(d, small_values=False))
    for name in ("stable_rank", "effective_rank", "r90", "r99", "fro_norm"):
        out[f"{name}_interval"] = getattr(interval, name)

    out["intruders"] = intruders

    return StepResult(out, upd.U, upd.V, angles_u, angles_v, top.S, [top.method, upd.method])


def _difference(Wt: torch.Tensor, Ws: torch.Tensor) -> torch.Tensor:
    """W_t - W_s in float64 from the stored tensors, exactly, with no float64 copy of either beside it."""
    out = Wt.to(torch.float64, copy=True)
    out -= Ws  # Ws widened inside the kernel
    return out


def _quick(base: BaseFactors, Wt: torch.Tensor, cfg: AnalysisConfig, warm: torch.Tensor | None,
           update: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], SVD]:
    """The quick suite: bf16 and absolute sparsity (SPEC 1), the update's rank metrics (SPEC 6), its norm
    relative to W0's and its top-K subspaces (SPEC 7), from W0 and W_t as stored. By default the update is
    formed a block at a time (geometry.offline.blocked); LoRA factors, or another ``update_svd``, take it whole."""
    W0 = base.W0
    m, n = W0.shape[-2:]
    if update is None and cfg.update_svd == "gram":
        blocks = BlockedUpdate(W0, Wt)
        gathered = blocks.gather(cfg.abs_tol)
        out = {"n_params": torch.full(W0.shape[:-2], float(m * n), dtype=torch.float64),
               "sparsity_bf16": 1.0 - gathered.changed / (m * n), "sparsity_abs": gathered.small / (m * n)}
        upd = update_svd(blocks, min(cfg.lock_k, m, n), warm, cfg.seed, gathered.gram)
    else:
        D = _difference(Wt, W0)
        out = _counts(W0, D, cfg)
        out["sparsity_bf16"] = 1.0 - M.fraction(M.changed_mask(W0, Wt))
        upd = _decompose_update(D, cfg, warm, update)
    _rank(out, upd.S, base.norm.to(upd.S.device))
    return out, upd


def _counts(W0: torch.Tensor, D: torch.Tensor, cfg: AnalysisConfig) -> dict[str, torch.Tensor]:
    """Parameter count and the absolute sparsity variant (SPEC 1) of a float64 update D."""
    m, n = W0.shape[-2:]
    return {"n_params": torch.full(W0.shape[:-2], float(m * n), dtype=torch.float64, device=W0.device),
            "sparsity_abs": M.count_small(D, cfg.abs_tol) / (m * n)}


def _decompose_update(D: torch.Tensor, cfg: AnalysisConfig, warm: torch.Tensor | None,
                      update: tuple[torch.Tensor, torch.Tensor] | None) -> SVD:
    """The update's full spectrum and top-K subspaces (SPEC 6, 7)."""
    m, n = D.shape[-2:]
    K = min(cfg.lock_k, m, n)
    if update is not None and K <= update[0].shape[-1]:
        return factored_svd(*update, K)  # exact, D never decomposed densely
    # no factors, or K above the adapter's rank: D's top-K subspace reaches past its range
    return _update_factors(D, K, cfg, warm)


def _rank(out: dict[str, torch.Tensor], S: torch.Tensor, base_norm: torch.Tensor) -> None:
    """The rank metrics of an update with spectrum S (SPEC 6), and its norm relative to W0's, into ``out``."""
    for name, value in zip(M.RankStats._fields, M.rank_stats(S), strict=True):
        out[name] = value
    out["rel_norm"] = out["fro_norm"] / base_norm


def _intruders(base: BaseFactors, Ut_top: torch.Tensor, cfg: AnalysisConfig) -> torch.Tensor:
    """SPEC 8 from the base's top vectors where they decide it; a matrix they leave undecided is counted against
    all of its base's left singular vectors (``_all_left``, once per matrix, when first needed)."""
    count = M.intruders(base.svd.U, Ut_top, cfg.intruder_threshold, complete=base.svd.U.shape[-1] >= min(
        base.W0.shape[-2:]))
    for i in count.isnan().nonzero().flatten().tolist():
        if i not in base.left:
            base.left[i] = _all_left(base, i)
        P, through_w0 = base.left[i]
        cos = mm(P.mT, mm(base.W0[i].double().mT, Ut_top[i]) if through_w0 else Ut_top[i])  # (p, 10)
        count[i] = M.intruder_count(cos, cfg.intruder_threshold)
    return count


def _all_left(base: BaseFactors, i: int) -> tuple[torch.Tensor, bool]:
    """What gives the cosines of any vector u with every left singular vector of W0[i]: (P, False) for
    cos = P^T u, or (P, True) for cos = P^T W0^T u. From the base's Gram matrix (its smaller side's eigenvectors
    and values, W0 being well-conditioned there): a wide W0's are its left vectors; a tall one's left vectors
    are W0 V / S, so u_j^T u = (v_j / s_j)^T W0^T u, without forming them (measured, 12288 x 4096: a 20 s
    eigh against a 131 s SVD). A base decomposed exactly takes the exact SVD again."""
    W0 = base.W0[i]
    if "exact" in base.svd.method:
        return exact_svd(W0).U, False
    evals, vecs = sym_eig(gram(W0), min(W0.shape))
    if W0.shape[0] < W0.shape[1]:
        return vecs, False
    return vecs / singular_values(evals), True


def _update_factors(D: torch.Tensor, K: int, cfg: AnalysisConfig, warm: torch.Tensor | None = None) -> SVD:
    """Spectrum and top-K subspaces of an update by the configured path (AnalysisConfig.update_svd)."""
    if cfg.update_svd == "exact":
        return exact_svd(D, K)
    if cfg.update_svd == "randomized":
        sD = spectrum(D, small_values=False)
        return randomized_svd(D, K, oversample=cfg.oversample, n_iter=cfg.n_iter, seed=cfg.seed, check=sD)
    return gram_top(D, K, warm=warm, seed=cfg.seed)


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


def group_size(shape: tuple[int, int], memory_mb: float) -> int:
    """How many (m, n) matrices fit in one batch within ``memory_mb``, at least one."""
    return max(1, int(memory_mb // group_mb(shape)))


def group_mb(shape: tuple[int, int], count: int = 1) -> float:
    """Working memory of measuring ``count`` (m, n) matrices together, in MiB, a bound: ~12 float64 copies'
    worth per matrix (W0 and W_t as stored, W0's factors and masks, the updates, Gram matrices and their
    eigensolvers' copies)."""
    m, n = shape
    return count * (12 * 8 * m * n + 8 * (m + n) ** 2) / 2**20
