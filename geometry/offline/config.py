"""Settings of an analysis: what to measure and how, kept apart from where outputs go (the CLI's).

Each field's ``help`` is also its command-line help: ``geometry analyze`` builds its options from this
class (geometry.cli), so a default and its explanation live here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from geometry.errors import GeometryError
from geometry.selection import as_patterns


def option(default, help: str, *, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()):
    """A dataclass field whose metadata the CLI turns into an option (help text, choices, old flag names)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


@dataclass
class AnalysisConfig:
    principal_k: int | None = option(
        None, "k of SPEC 2 and 4: size of W0's principal subspace (default: min(512, max(1, rank // 8)) "
        "per matrix)", aliases=("--k",))
    lock_k: int = option(16, "K of SPEC 7: size of the update subspaces compared for locking (the paper's "
                         "Sim_16)", aliases=("--K",))
    tau: float = option(0.9, "locking threshold on Sim_K to the final update (SPEC 7)")
    alpha: float = option(0.5, "mask fraction of the localisation masks (SPEC 5); also their random baseline")
    mask_rank: int = option(64, "rank r of the W0 reconstruction behind the principal mask (SPEC 5)")
    abs_tol: float = option(1e-5, "tolerance of the older absolute sparsity variant (SPEC 1)")
    intruder_threshold: float = option(0.5, "|cos| below which a top-10 direction of W_t is an intruder (SPEC 8)")
    include: tuple[str, ...] = option((), "regex over parameter names to keep (repeatable); a matched embedding "
                                      "is kept too")
    exclude: tuple[str, ...] = option((), "regex over parameter names to drop (repeatable)")
    embeddings: bool = option(False, "also measure embeddings and lm_head (SPEC: only when asked)")
    on_mismatch: str = option("error", "a matrix missing from a checkpoint or of another shape: 'error', or "
                              "'skip' it and list it in the notes", choices=("error", "skip"))
    allow_pickle: bool = option(False, "read .bin pickle checkpoints (with weights_only=True); only for files you "
                                "trust: unpickling can run code")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    memory_mb: float = option(2048.0, "memory budget of one group of same-shape matrices, working copies included")
    # "gram" and "randomized" are checked against the exact spectrum and fall back to "exact", saying so
    update_svd: str = option("gram", "how updates are decomposed: float64 Gram eigh (checked), seeded randomized "
                             "SVD (Halko et al. 2011, checked) or LAPACK SVD",
                             choices=("gram", "randomized", "exact"))
    seed: int = option(0, "seed of every randomized method")
    n_iter: int = option(4, "power iterations of the randomized SVD")
    oversample: int = option(8, "extra columns of the randomized SVD")

    def __post_init__(self):
        if self.principal_k is not None and self.principal_k < 1:
            raise GeometryError(f"principal_k must be a positive integer, got {self.principal_k}")
        if self.lock_k < 1:
            raise GeometryError(f"lock_k must be a positive integer, got {self.lock_k}")
        if not 0 < self.tau <= 1:
            raise GeometryError(f"tau must lie in (0, 1], got {self.tau}")
        if not 0 < self.alpha < 1:
            raise GeometryError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.mask_rank < 1:
            raise GeometryError(f"mask_rank must be a positive integer, got {self.mask_rank}")
        if self.update_svd not in ("gram", "randomized", "exact"):
            raise GeometryError(f"update_svd must be 'gram', 'randomized' or 'exact', got {self.update_svd!r}")
        if self.on_mismatch not in ("error", "skip"):
            raise GeometryError(f"on_mismatch must be 'error' or 'skip', got {self.on_mismatch!r}")
        if self.memory_mb <= 0:
            raise GeometryError(f"memory_mb must be positive, got {self.memory_mb}")
        self.include, self.exclude = as_patterns(self.include, "include"), as_patterns(self.exclude, "exclude")
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
