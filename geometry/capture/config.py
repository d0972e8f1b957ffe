"""What a Recorder records and how: RecorderConfig, the one place for each capture setting and its default."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from geometry.capture.store import CHUNK_STEPS
from geometry.capture.tracking import DEFAULT_EPS, DEFAULT_TOL
from geometry.errors import GeometryError
from geometry.selection import as_patterns

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IO_KNOBS = ("queue_size", "track_batch_mb", "on_error", "base_device", "label", "tracking_chunk")  # not measured


@dataclass
class RecorderConfig:
    """What a Recorder (or GeometryCallback) records and how; regexes are matched with re.search against the
    matrices' names (as the model's checkpoints name them: geometry.capture.matrices).

    Raises
    ------
    GeometryError
        A negative interval, K below 1, an unknown dtype or choice.

    Examples
    --------
    >>> from geometry import RecorderConfig
    >>> RecorderConfig(snapshot_every=100, include=("self_attn",)).include
    ('self_attn',)
    """

    include: tuple[str, ...] = ()  # regexes; empty: every 2-D weight of a Linear layer (geometry.selection)
    exclude: tuple[str, ...] = ()
    embeddings: bool = False  # also embeddings and lm_head (SPEC: only when asked)
    snapshot_every: int = 50  # a checkpoint every N steps, plus the last; 0: the last only
    track_every: int = 1  # tracking state every N steps (and at snapshots); 0 disables tracking
    lock_k: int = 16  # K of SPEC item 7: the tracked top-K subspaces, the paper's Sim_16
    oversample: int = 8  # extra columns carried by the iteration (Halko et al. 2011: 5-10)
    tol: float = DEFAULT_TOL  # per-step convergence test of geometry.capture.tracking
    eps: float = DEFAULT_EPS  # movement test of refined steps (snapshots, cold starts)
    max_iters: int = 8  # then the exact SVD, flagged in the tracking state
    seed: int = 0  # random start of the first step's iteration
    tracking_dtype: str = "float16"  # U_K, V_K on disk; the cast moves Sim_K by < 1e-3 (tests)
    snapshot_dtype: str = "stored"  # "stored" keeps bf16 bit-exact (SPEC item 1); or float32/bfloat16/float16
    base_device: str = "cpu"  # where W0 lives: "cpu" saves accelerator memory; "device" avoids a copy per step
    queue_size: int = 2  # snapshots waiting for the disk; more = less blocking, more host memory
    track_batch_mb: float = 64  # same-shape updates D_t (float32) tracked together, per shape; 0: one at a time
    on_error: str = "raise"  # a failed write: "raise" at the next step / close, or "warn" and go on
    tracking_chunk: int = CHUNK_STEPS  # tracked steps merged into one file (long runs: few files); 0: a file per step
    label: str = "base"  # the base's label in the manifest

    def __post_init__(self):
        self.include, self.exclude = as_patterns(self.include, "include"), as_patterns(self.exclude, "exclude")
        if self.snapshot_every < 0 or self.track_every < 0:
            raise GeometryError("RecorderConfig: snapshot_every and track_every must be >= 0")
        if (self.lock_k < 1 or self.oversample < 0 or self.max_iters < 1 or self.queue_size < 1
                or self.track_batch_mb < 0 or self.tracking_chunk < 0):
            raise GeometryError("RecorderConfig: need lock_k >= 1, oversample >= 0, max_iters >= 1, queue_size >= 1, "
                                "track_batch_mb >= 0, tracking_chunk >= 0")
        if self.tracking_dtype not in DTYPES or self.snapshot_dtype not in (*DTYPES, "stored"):
            raise GeometryError(f"RecorderConfig: dtypes are one of {', '.join(DTYPES)} (or 'stored' for snapshots)")
        if self.base_device not in ("cpu", "device") or self.on_error not in ("raise", "warn"):
            raise GeometryError("RecorderConfig: base_device is 'cpu' or 'device'; on_error 'raise' or 'warn'")

    def settings(self) -> dict:
        """What the manifest records (and a resumed run must repeat): everything but I/O knobs."""
        d = asdict(self)
        for key in IO_KNOBS:
            d.pop(key)
        return d

    def tracking_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.tracking_dtype]

    def snapshot_torch_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a snapshot of a tensor stored as ``stored`` is written in."""
        return stored if self.snapshot_dtype == "stored" else DTYPES[self.snapshot_dtype]
