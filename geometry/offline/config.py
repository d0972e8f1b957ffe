"""Settings of an analysis: what to measure and how, kept apart from where outputs go (the CLI's).

Each field's ``help`` is also its command-line help: ``geometry analyze`` builds its options from this
class (geometry.cli), so a default and its explanation live here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from geometry.errors import GeometryError
from geometry.options import check_choices, option
from geometry.selection import as_patterns

if TYPE_CHECKING:
    import torch

PAPER_HIDDEN = 4096  # Qwen3-8B's hidden size: the width the paper's k = 512 and r = 64 were chosen for
PAPER_K, PAPER_MASK_RANK = 512, 64
ON_MISMATCH = ("error", "skip")  # what a matrix missing from a checkpoint (or of another shape) does


def scaled(at_paper_width: int, hidden: int) -> int:
    """A size the paper set for hidden 4096, scaled to a model of hidden size ``hidden`` (SPEC items 2, 5)."""
    return max(1, round(at_paper_width * hidden / PAPER_HIDDEN))


@dataclass
class AnalysisConfig:
    """What an analysis measures and how; every field is also a ``geometry analyze`` option (``--field-name``),
    with the help text given here (docs/metrics.md defines each quantity).

    Raises
    ------
    GeometryError
        A value out of range (k, K below 1; tau outside (0, 1]; alpha outside (0, 1); a choice not offered).

    Examples
    --------
    >>> from geometry import AnalysisConfig
    >>> AnalysisConfig(quick=True, lock_k=8).lock_k
    8
    >>> AnalysisConfig(tau=2)
    Traceback (most recent call last):
    ...
    geometry.errors.GeometryError: tau must lie in (0, 1], got 2
    """

    principal_k: int | None = option(
        None, "k of SPEC 2 and 4: size of W0's principal subspace (default: round(512 h / 4096), h the "
        "model's hidden size, else the matrix's smaller side; at most the rank)")
    lock_k: int = option(16, "K of SPEC 7: size of the update subspaces compared for locking (the paper's "
                         "Sim_16)")
    tau: float = option(0.9, "locking threshold on Sim_K to the final update (SPEC 7)")
    # 0.3: the paper's 30% random baseline; its SFT row (29.66% overlap at 92.73% density) rules out 0.5
    alpha: float = option(0.3, "mask fraction of the localisation masks (SPEC 5); also their random baseline")
    mask_rank: int | None = option(None, "rank r of the W0 reconstruction behind the principal mask (SPEC 5) "
                                   "(default: round(64 h / 4096), h as for --principal-k)")
    abs_tol: float = option(1e-5, "tolerance of the older absolute sparsity variant (SPEC 1)")
    intruder_threshold: float = option(0.5, "|cos| below which a top-10 direction of W_t is an intruder (SPEC 8)")
    quick: bool = option(False, "measure the update alone: sparsity, concentration, norms, rank metrics, signal rank "
                         "and locking of D_t (what checkpoint-diff tools report, and more); no decomposition of W0 or "
                         "W_t, so no angles, NSS, overlaps, masks, intruders or interval metrics")
    include: tuple[str, ...] = option((), "regex over parameter names to keep (repeatable); a matched embedding "
                                      "is kept too")
    exclude: tuple[str, ...] = option((), "regex over parameter names to drop (repeatable)")
    embeddings: bool = option(False, "also measure embeddings and lm_head (SPEC: only when asked)")
    on_mismatch: str = option("error", "a matrix missing from a checkpoint or of another shape: 'error', or "
                              "'skip' it and list it in the notes", choices=ON_MISMATCH)
    allow_pickle: bool = option(False, "read pickle checkpoints: .bin files and verl's FSDP shards (with "
                                "weights_only=True), DeepSpeed ZeRO checkpoints (through DeepSpeed, which unpickles "
                                "them in full); only for files you trust: unpickling can run code")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    memory_mb: float = option(2048.0, "memory budget of the matrices measured at once (a group of same-shape "
                              "matrices per thread), working copies included")
    # one thread per core: each measures its own groups with single-threaded kernels, as many side by side as the
    # memory budget holds; threads left idle go to the kernels of groups measured alone (geometry.offline.threads)
    threads: int = option(0, "CPU threads (0: one per core): groups measured side by side, as many as the memory "
                          "budget holds, the threads left over given to their kernels; a GPU measures one group "
                          "at a time")
    # "gram" and "randomized" are checked against the exact spectrum and fall back to "exact", saying so
    update_svd: str = option("gram", "how updates are decomposed: float64 Gram eigh (checked), seeded randomized "
                             "SVD (Halko et al. 2011, checked) or LAPACK SVD",
                             choices=("gram", "randomized", "exact"))
    seed: int = option(0, "seed of every randomized method")
    n_iter: int = option(4, "power iterations of the randomized SVD")
    oversample: int = option(8, "extra columns of the randomized SVD")
    # opt-in: the lens reads the unembedding, which the analysis otherwise leaves out
    lens: bool = option(False, "static logit lens (docs/metrics.md): the top singular directions of each run's final "
                        "update of the matrices writing to the residual stream (o_proj, down_proj, experts' down "
                        "projections), read through the final norm and the unembedding as the tokens they promote "
                        "and suppress; lens.json and a section in summary.md")
    lens_top: int = option(4, "singular directions per matrix of the logit lens")
    lens_tokens: int = option(10, "tokens promoted and suppressed listed per direction of the logit lens")

    def __post_init__(self):
        if self.principal_k is not None and self.principal_k < 1:
            raise GeometryError(f"principal_k must be a positive integer, got {self.principal_k}")
        if self.lock_k < 1:
            raise GeometryError(f"lock_k must be a positive integer, got {self.lock_k}")
        if not 0 < self.tau <= 1:
            raise GeometryError(f"tau must lie in (0, 1], got {self.tau}")
        if not 0 < self.alpha < 1:
            raise GeometryError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.mask_rank is not None and self.mask_rank < 1:
            raise GeometryError(f"mask_rank must be a positive integer, got {self.mask_rank}")
        check_choices(self)  # update_svd, on_mismatch
        if self.threads < 0:
            raise GeometryError(f"threads must be 0 (one per core) or a positive integer, got {self.threads}")
        if self.memory_mb <= 0:
            raise GeometryError(f"memory_mb must be positive, got {self.memory_mb}")
        if self.lens_top < 1 or self.lens_tokens < 1:
            raise GeometryError(f"lens_top and lens_tokens must be positive integers, got {self.lens_top} and "
                                f"{self.lens_tokens}")
        self.include, self.exclude = as_patterns(self.include, "include"), as_patterns(self.exclude, "exclude")
        self.torch_device()  # validates the device string

    def principal_size(self, shape: tuple[int, int], hidden: int | None) -> int:
        """k for an (m, n) matrix of a model of hidden size ``hidden`` (None: unknown)."""
        return min(self.principal_k or scaled(PAPER_K, hidden or min(shape)), *shape)

    def mask_size(self, shape: tuple[int, int], hidden: int | None) -> int:
        """r for an (m, n) matrix of a model of hidden size ``hidden`` (None: unknown)."""
        return min(self.mask_rank or scaled(PAPER_MASK_RANK, hidden or min(shape)), *shape)

    def torch_device(self) -> torch.device:
        import torch  # here, not at the top: `geometry --help` builds its options from this class

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise GeometryError(f"unknown device {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise GeometryError(f"device {self.device!r} asked for, but CUDA is not available")
        return dev
