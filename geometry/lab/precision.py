"""The study's learning rates, set by the paper's precision regime rather than tuned.

Why it matters: bf16 sparsity and mask localisation (SPEC 1, 5) count entries whose bf16 value changed, so
they depend on how large an optimizer step is beside the bf16 spacing of the weights. Shen et al.
(arXiv 2606.07082) train OPD and RLVR at lr 1e-6 and SFT at 1e-5 on Qwen3-8B. Adam moves an entry by at
most about lr per step (exactly lr at its first step, m/sqrt(v) = +-1), so lr / spacing is the number of
steps an entry needs, at best, to cross one bf16 spacing. The rule, fixed before any verdict was seen:

    lr_OPD = lr_RLVR = 1e-6 * G(student) / G(8B),   lr_SFT = 10 * lr_OPD   (the paper's ratio),

G = geometric mean over entries of the bf16 spacing ulp(w) of the measured matrices (Linear weights, no
embeddings). The geometric mean, not the median: the spacing is a power of two, so its median jumps by 2x
when a weight distribution's median crosses a binade, while the geometric mean scales smoothly with it.

The 8B side is an estimate (we cannot load Qwen3-8B here): entries ~ N(0, 0.02^2), the initializer_range
of Llama/Qwen configs at hidden 4096 and about the spread measured in trained 7-8B checkpoints' projection
matrices (0.015-0.03 by matrix kind). ``paper_spacing(0.015)`` and ``(0.03)`` bracket the lr by +-35%.
"""

from __future__ import annotations

import torch

PAPER_LR = 1e-6  # OPD and RLVR in the paper; SFT 1e-5
SFT_LR_RATIO = 10.0  # the paper's SFT : OPD/RLVR learning-rate ratio
PAPER_WEIGHT_STD = 0.02  # the estimated 8B entry scale (module docstring)
BF16_MANTISSA = 7  # stored mantissa bits: spacing = 2^(exponent - 7)


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent bf16 values at each entry's bf16 rounding (its ulp), elementwise."""
    a = w.detach().to(torch.bfloat16).float().abs()
    tiny = torch.finfo(torch.bfloat16).tiny  # subnormals: one spacing for all of them
    return torch.exp2(torch.floor(torch.log2(a.clamp(min=tiny))) - BF16_MANTISSA)


def geometric_mean_spacing(tensors: list[torch.Tensor]) -> float:
    """G: exp(mean log ulp(w)) over all entries of ``tensors``."""
    logs = torch.cat([bf16_spacing(t).log().flatten() for t in tensors])
    return float(logs.double().mean().exp())


def paper_spacing(std: float = PAPER_WEIGHT_STD, n: int = 1_000_000) -> float:
    """G of an 8B model's entries, estimated as N(0, std^2) (seeded, so always the same number)."""
    gen = torch.Generator().manual_seed(0)
    return geometric_mean_spacing([torch.randn(n, generator=gen) * std])


def rule_lr(student_matrices: list[torch.Tensor], std: float = PAPER_WEIGHT_STD) -> float:
    """lr_OPD = lr_RLVR for the student: the paper's 1e-6 scaled by G(student) / G(8B)."""
    return PAPER_LR * geometric_mean_spacing(student_matrices) / paper_spacing(std)
