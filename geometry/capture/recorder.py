"""Training-time capture: snapshots of the tracked weights and per-step subspace tracking, framework-free.

    with Recorder(model, "runs/opd/geometry") as rec:
        for step in range(1, n_steps + 1):
            ...; optimizer.step()
            rec.step(step)  # after every optimizer step

At a tracked step t, for every tracked matrix (geometry.capture.tracking):
    D_t = W_t - W0 (float32),  ||D_t||_F,  top-K singular values and subspaces U_K, V_K of D_t
by one or a few warm-started subspace iterations: O(mnK) work on the training thread, O((m + n)K)
bytes stored. Matrices of one shape go through the iteration together, in batches of up to
``track_batch_mb`` of float32 updates, so that small matrices do not pay per-call overheads one by one.
Every ``snapshot_every`` steps (and at the end) the tracked tensors are copied to the
CPU and written by the store's background thread (geometry.capture.store), as Trainer-style checkpoints.
W0 stays on the CPU in its stored dtype (a lossless copy, half the size of float32 for a bf16 model).

Several processes (geometry.capture.distributed): rank 0 writes. Unsharded weights (DDP) are the same on every
rank, so other ranks' recorders do nothing. Sharded weights (FSDP1, FSDP2, ZeRO-3) are gathered one
matrix at a time, so there every rank must create the recorder and call ``step`` with the same steps;
rank 0's errors are raised on every rank, so that none is left waiting in a gather.

Before saving a training checkpoint of its own, a loop calls ``rec.flush()``: the store then holds every
step up to it, and a run resumed from that checkpoint misses none.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from geometry.capture.distributed import FullParameters, broadcast, is_writer
from geometry.capture.store import Store, Tracked, read_manifest, read_tracking
from geometry.capture.tracking import DEFAULT_EPS, DEFAULT_TOL, SubspaceTracker
from geometry.errors import GeometryError
from geometry.selection import as_patterns, choose

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RecorderConfig:
    """What to record and how. Regexes are matched with re.search against parameter names."""

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
    label: str = "base"  # the base's label in the manifest

    def __post_init__(self):
        self.include, self.exclude = as_patterns(self.include, "include"), as_patterns(self.exclude, "exclude")
        if self.snapshot_every < 0 or self.track_every < 0:
            raise GeometryError("RecorderConfig: snapshot_every and track_every must be >= 0")
        if (self.lock_k < 1 or self.oversample < 0 or self.max_iters < 1 or self.queue_size < 1
                or self.track_batch_mb < 0):
            raise GeometryError("RecorderConfig: need lock_k >= 1, oversample >= 0, max_iters >= 1, queue_size >= 1, "
                                "track_batch_mb >= 0")
        if self.tracking_dtype not in _DTYPES or self.snapshot_dtype not in (*_DTYPES, "stored"):
            raise GeometryError(f"RecorderConfig: dtypes are one of {', '.join(_DTYPES)} (or 'stored' for snapshots)")
        if self.base_device not in ("cpu", "device") or self.on_error not in ("raise", "warn"):
            raise GeometryError("RecorderConfig: base_device is 'cpu' or 'device'; on_error 'raise' or 'warn'")

    def settings(self) -> dict:
        """What the manifest records (and a resumed run must repeat): everything but I/O knobs."""
        d = asdict(self)
        for key in ("queue_size", "track_batch_mb", "on_error", "base_device", "label"):
            d.pop(key)
        return d


@dataclass
class RecorderStats:
    """Time and work spent by the recorder on the training thread."""

    tracked_steps: int = 0
    snapshots: int = 0
    tracking_seconds: float = 0.0  # forming D_t and the subspace iterations
    snapshot_seconds: float = 0.0  # copies to the CPU, including any wait for a full queue
    iterations: int = 0  # subspace iterations, all matrices and steps
    fallbacks: int = 0  # matrix-steps that needed the exact SVD


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / DeepSpeed (``.module``) and torch.compile (``_orig_mod``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            return model


def select_parameters(model: nn.Module | FullParameters, cfg: RecorderConfig) -> dict[str, nn.Parameter]:
    """The tracked parameters by name (geometry.selection: Linear weights, embeddings only when asked).

    Names and shapes are those of the full model: wrapper prefixes (FSDP1, torch.compile) are dropped and a
    shard is judged by its full shape (geometry.distributed), so every rank selects the same matrices.
    """
    full = model if isinstance(model, FullParameters) else FullParameters(model)
    shapes = full.shapes
    names = sorted(choose(shapes, include=cfg.include, exclude=cfg.exclude, embeddings=cfg.embeddings,
                          linear=full.linear_weights()))
    if not names:
        raise GeometryError("Recorder: no parameter matches the include/exclude patterns")
    empty = [n for n in names if shapes[n].numel() == 0]
    if empty:
        raise GeometryError(f"Recorder: parameter {empty[0]} is empty")
    return {n: full.params[n] for n in names}


class Recorder:
    """Records a training run into a geometry store (module docstring). A context manager.

    step: the optimizer step the model is at now: 0 for a fresh run (its weights are the base W0);
    a resumed run passes its current step and W0 is read from the store, which must exist.
    Only rank 0 opens the store (``store`` is None on other ranks).
    """

    def __init__(self, model: nn.Module, out_dir: str | Path, config: RecorderConfig | None = None, *,
                 step: int = 0):
        self.config = cfg = config or RecorderConfig()
        self.model = unwrap(model)
        self.full = FullParameters(self.model)  # a collective under FSDP1: every rank gets here
        self.params = select_parameters(self.full, cfg)
        self.shapes = {n: tuple(self.full.shapes[n]) for n in self.params}  # full shapes, also of shards
        self.writer = is_writer()
        self.collective = self.full.sharded(self.params)  # every rank takes part in the gathers
        self.tracker = SubspaceTracker(cfg.lock_k, cfg.oversample, tol=cfg.tol, eps=cfg.eps, max_iters=cfg.max_iters,
                                       seed=cfg.seed)
        self.store: Store | None = None
        self.done: int | None = None  # steps <= done were recorded by an earlier run
        self._w0: dict[str, torch.Tensor] = {}
        self._last: int | None = None  # last step seen
        self._snapped: int | None = None  # last step snapshotted
        self.stats = RecorderStats()
        self._batches = _Batches(self.shapes, cfg.track_batch_mb)
        if not (self.writer or self.collective):
            return  # another rank of an unsharded (DDP) run: rank 0 records the same weights
        base = {n: w.to("cpu", copy=True) for n, w in self.full.gather(self.params)} if step == 0 else None
        err = None
        if self.writer:
            try:
                self._open(out_dir, base, step)
            except GeometryError as e:
                err = e
        self.done = broadcast(self.done, self.collective)  # every rank skips the same steps
        self._agree(err)

    def step(self, step: int) -> None:
        """Call after each optimizer step with the step count (1 after the first optimizer step)."""
        if (self.done is not None and step <= self.done) or (self._last is not None and step <= self._last):
            return  # recorded by an earlier run, or already seen
        self._last = step
        cfg = self.config
        snap = cfg.snapshot_every > 0 and step % cfg.snapshot_every == 0
        track = cfg.track_every > 0 and (snap or step % cfg.track_every == 0)
        if self.writer or self.collective:
            self._record(step, snap, track)

    def flush(self) -> None:
        """Wait until every queued write has landed (rank 0; a no-op elsewhere). Call it before saving a
        training checkpoint: a run resumed from that checkpoint then finds all its steps in the store."""
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        """Snapshot (and track, refined) the last step seen if not yet done; finish all writes."""
        if (self.writer or self.collective) and self._last is not None and self._snapped != self._last:
            self._record(self._last, True, self.config.track_every > 0)
        if self.store is not None:
            self.store.close(final_step=self._last if self._last is not None else self.done)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.store is not None:  # training failed: keep what was recorded, do not call the current weights final
            try:
                self.store.close()
            except GeometryError as e:  # do not hide the training error behind a write error
                warnings.warn(str(e), stacklevel=2)

    # ---- internals ----

    def _open(self, out_dir: str | Path, base: dict[str, torch.Tensor] | None, step: int) -> None:
        """Rank 0: open the store, check it against this run, keep W0."""
        cfg = self.config
        hf_config = getattr(self.model, "config", None)
        try:
            self.store = Store.open(out_dir, base, settings=cfg.settings(), label=cfg.label,
                                    config=hf_config.to_dict() if hasattr(hf_config, "to_dict") else None,
                                    snapshot_bytes=sum(self._snapshot_nbytes(n) for n in self.params),
                                    queue_size=cfg.queue_size, on_error=cfg.on_error)
        except (OSError, SafetensorError) as e:  # e.g. the disk filled up while the base was written
            raise GeometryError(f"cannot write the geometry store {out_dir}: {e}") from None
        self.done = self.store.last_step
        if step == 0 and self.done is not None:
            self.store.close()  # a run from step 0 is a new run: splicing it onto the old one would mix two runs
            raise GeometryError(f"store {out_dir} already holds steps up to {self.done}; record a new run into "
                                "a new folder (a resumed run passes its current step)")
        if step > (self.done or 0):
            warnings.warn(f"store {out_dir} holds steps up to {self.done or 0}, the run resumes at step {step}: "
                          f"steps {(self.done or 0) + 1}..{step} stay missing (flush the recorder before saving "
                          "a training checkpoint)", stacklevel=3)
        self._w0 = self._keep_base(base if base is not None else self.store.base())
        self._warm_start()

    def _record(self, step: int, snap: bool, track: bool) -> None:
        """Snapshot and/or track one step: one gather per matrix; rank 0 computes and writes."""
        copies, records, err = {}, {}, None
        batches = self._batches
        batches.start()
        with torch.no_grad():
            for name, w in self.full.gather(self.params):  # (m, n) the full matrix, on rank 0 only
                if err is not None:
                    continue  # keep taking part in the gathers: the other ranks wait in them
                try:
                    t0 = time.perf_counter()
                    if snap:
                        copies[name] = self._snapshot_copy(w)
                    t1 = time.perf_counter()
                    if track:
                        w0 = self._w0[name].to(w.device, non_blocking=True)
                        full = batches.add(name, w, w0)  # D_t = W_t - W0 into the batch of its shape
                        if full is not None:
                            records.update(self._track(*full, refine=snap))
                    self.stats.snapshot_seconds += t1 - t0
                    self.stats.tracking_seconds += time.perf_counter() - t1
                except Exception as e:  # noqa: BLE001 - raised below, after the last gather
                    err = e
            if err is None and track and self.writer:
                try:
                    t0 = time.perf_counter()
                    for full in batches.rest():
                        records.update(self._track(*full, refine=snap))
                    self.stats.tracking_seconds += time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    err = e
            if err is None and self.writer:
                err = self._put(step, copies if snap else None, records if track else None)
        if snap:
            self._snapped = step
        self._agree(err)

    def _put(self, step: int, copies: dict | None, records: dict | None) -> GeometryError | None:
        try:
            if copies is not None:  # queued before tracking: a step's tracking never lands without its snapshot
                t0 = time.perf_counter()
                self.store.put_snapshot(step, copies)
                self.stats.snapshots += 1
                self.stats.snapshot_seconds += time.perf_counter() - t0
            if records is not None:
                t0 = time.perf_counter()
                self.store.put_tracking(step, records, _DTYPES[self.config.tracking_dtype])
                self.stats.tracked_steps += 1
                self.stats.tracking_seconds += time.perf_counter() - t0
        except GeometryError as e:
            return e
        return None

    def _agree(self, err: BaseException | None) -> None:
        """Raise err; under a collective recorder other ranks raise rank 0's error too, so none waits forever."""
        msg = broadcast(None if err is None else f"{type(err).__name__}: {err}", self.collective)
        if err is not None:
            raise err
        if msg is not None:
            raise GeometryError(f"Recorder on rank 0: {msg}")

    def _track(self, names: list[str], d: torch.Tensor, fro: torch.Tensor, refine: bool) -> dict[str, Tracked]:
        """One tracking step for same-shape matrices, their updates D_t stacked in d (B, m, n), norms fro (B,)."""
        ests = self.tracker.update_many(names, d, refine=refine, fro=fro)
        k, _ = self.tracker.dims(tuple(d.shape[1:]))
        self.stats.iterations += sum(e.iters for e in ests)
        self.stats.fallbacks += sum(e.exact for e in ests)
        return {n: Tracked(e.fro, e.s[:k], e.u[:, :k], e.v[:, :k], e.iters, e.residual, e.exact)
                for n, e in zip(names, ests, strict=True)}

    def _snapshot_dtype(self, name: str) -> torch.dtype:
        stored = self.params[name].dtype
        return stored if self.config.snapshot_dtype == "stored" else _DTYPES[self.config.snapshot_dtype]

    def _snapshot_copy(self, w: torch.Tensor) -> torch.Tensor:
        dtype = w.dtype if self.config.snapshot_dtype == "stored" else _DTYPES[self.config.snapshot_dtype]
        return w.to("cpu", dtype, copy=True).contiguous()

    def _snapshot_nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * torch.empty((), dtype=self._snapshot_dtype(name)).element_size()

    def _keep_base(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, shape in self.shapes.items():
            if n not in base or tuple(base[n].shape) != shape:
                raise GeometryError(f"Recorder: store {self.store.root} has no base tensor {n} of shape {shape}")
        if self.config.base_device == "device":
            return {n: base[n].to(p.device) for n, p in self.params.items()}
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self.params.values())
        return {n: base[n].pin_memory() if pin else base[n] for n in self.params}

    def _warm_start(self) -> None:
        """A resumed run continues the subspace iteration from the last stored estimate."""
        steps = read_manifest(self.store.root).tracking_steps
        if not steps:
            return
        for n, rec in read_tracking(self.store.root, steps[-1]).items():
            if n in self.params:
                self.tracker.warm_start(n, rec.v, self.shapes[n])


class _Batches:
    """Updates D_t = W_t - W0 (float32) of same-shape matrices, gathered into batches of at most ``mb`` MiB per
    shape (at least one matrix) for geometry.capture.tracking's batched iteration. One buffer per shape, kept from
    step to step (allocating them afresh costs page faults every step); memory: one batch per shape."""

    def __init__(self, shapes: dict[str, tuple[int, int]], mb: float):
        self.count: dict[tuple[int, int], int] = {}  # tracked matrices of each shape
        for shape in shapes.values():
            self.count[shape] = self.count.get(shape, 0) + 1
        self.size = {s: min(c, max(1, int(mb * 2**20 // (4 * math.prod(s))))) for s, c in self.count.items()}
        self.buf: dict[tuple[int, int], torch.Tensor] = {}
        self.fro: dict[tuple[int, int], torch.Tensor] = {}  # ||D_t||_F of each, taken while D_t is in cache
        self.start()

    def start(self) -> None:
        """Begin a step: no matrix added yet."""
        self.left = dict(self.count)  # matrices of each shape not yet in a batch this step
        self.names: dict[tuple[int, int], list[str]] = {}

    def add(self, name: str, w: torch.Tensor, w0: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
        """Put W_t - W0 into its shape's batch; the batch (names, D (B, m, n), ||D||_F (B,)) when that makes it
        full. The batch is valid until the next ``add`` of that shape."""
        shape = tuple(w.shape)
        buf = self.buf.get(shape)
        if buf is None or buf.device != w.device:
            buf = self.buf[shape] = torch.empty((self.size[shape], *shape), dtype=torch.float32, device=w.device)
            self.fro[shape] = torch.empty(self.size[shape], dtype=torch.float32, device=w.device)
        names = self.names.setdefault(shape, [])
        i = len(names)
        torch.sub(w.float(), w0.float(), out=buf[i])  # float32 arithmetic, exact bf16 -> float32 upcasts
        torch.linalg.vector_norm(buf[i], out=self.fro[shape][i])
        names.append(name)
        if len(names) < min(buf.shape[0], self.left[shape]):
            return None
        self.left[shape] -= len(names)
        del self.names[shape]
        return self._batch(shape, names)

    def rest(self):
        """The batches not yet full (none, when every matrix was added)."""
        for shape in list(self.names):
            yield self._batch(shape, self.names.pop(shape))

    def _batch(self, shape, names):
        return names, self.buf[shape][: len(names)], self.fro[shape][: len(names)]
