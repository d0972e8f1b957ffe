"""Settings of an analysis: what to measure and how, kept apart from where outputs go (the CLI's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from geometry.errors import GeometryError


@dataclass
class AnalysisConfig:
    k: int | None = None  # principal subspace size (SPEC 2, 4); None: min(512, max(1, rank // 8)) per matrix
    K: int = 16  # locking subspace size (SPEC 7), the paper's Sim_16
    tau: float = 0.9  # locking threshold on Sim_K to the final update (SPEC 7)
    alpha: float = 0.5  # mask fraction for localisation (SPEC 5); also its random baseline
    mask_rank: int = 64  # rank of the W0 reconstruction behind the principal mask (SPEC 5)
    abs_tol: float = 1e-5  # tolerance of the older absolute sparsity variant (SPEC 1)
    intruder_threshold: float = 0.5  # |cos| below which a top-10 direction of W_t is an intruder (SPEC 8)
    include: str | None = None  # regex over parameter names, applied after the default Linear-weight filter
    exclude: str | None = None
    embeddings: bool = False  # also embed_tokens / lm_head (SPEC: "only when asked")
    on_mismatch: str = "error"  # "error" or "skip" a name missing from a checkpoint or of another shape
    allow_pickle: bool = False  # read .bin pickle checkpoints (weights_only=True); never by default
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    memory_mb: float = 2048.0  # budget for one group of same-shape matrices, working copies included
    # spectrum and top-K subspaces of each update: "gram" (float64 Gram eigh, checked), "randomized"
    # (seeded, Halko et al. 2011, checked against the exact spectrum: pays off for very large matrices
    # on a GPU) or "exact" (LAPACK SVD); the checked paths fall back to "exact" and say so
    update_svd: str = "gram"
    seed: int = 0  # seed of every randomized method
    n_iter: int = 4  # power iterations of the randomized SVD (Halko et al. 2011)
    oversample: int = 8  # extra columns of the randomized SVD

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise GeometryError(f"k must be a positive integer, got {self.k}")
        if self.K < 1:
            raise GeometryError(f"K must be a positive integer, got {self.K}")
        if not 0 < self.tau <= 1:
            raise GeometryError(f"tau must lie in (0, 1], got {self.tau}")
        if not 0 < self.alpha < 1:
            raise GeometryError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.update_svd not in ("gram", "randomized", "exact"):
            raise GeometryError(f"update_svd must be 'gram', 'randomized' or 'exact', got {self.update_svd!r}")
        if self.on_mismatch not in ("error", "skip"):
            raise GeometryError(f"on_mismatch must be 'error' or 'skip', got {self.on_mismatch!r}")
        if self.memory_mb <= 0:
            raise GeometryError(f"memory_mb must be positive, got {self.memory_mb}")
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise GeometryError(f"{name} is not a valid regex ({pattern!r}): {e}") from None
        self.torch_device()  # validates the device string

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise GeometryError(f"unknown device {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise GeometryError(f"device {self.device!r} asked for, but CUDA is not available")
        return dev
