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

``rec.live()``: run-level values of the latest tracked step and snapshot, for a training loop's logs
(geometry.capture.callbacks sends them to the Trainer's experiment trackers). Computed when asked, from
the estimates the recorder keeps of its last two tracked steps; the snapshot's bf16 sparsity is counted
while the snapshot is taken (one comparison per entry, on the weights' device).
"""


from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from torch import nn

from geometry.capture.batches import Batch, UpdateBatches
from geometry.capture.config import RecorderConfig
from geometry.capture.distributed import broadcast, is_writer
from geometry.capture.matrices import matrices_of, select_parameters, unwrap
from geometry.capture.store import Store, read_manifest, read_tracking
from geometry.capture.tracking import Estimate, SubspaceTracker
from geometry.capture.trajectory import run_values
from geometry.errors import GeometryError
from geometry.metrics import changed_mask
from geometry.selection import coverage

__all__ = ["Live", "Recorder", "RecorderConfig", "RecorderStats"]


@dataclass
class RecorderStats:
    """Time and work spent by the recorder on the training thread."""

    tracked_steps: int = 0
    snapshots: int = 0
    tracking_seconds: float = 0.0  # forming D_t and the subspace iterations
    snapshot_seconds: float = 0.0  # copies to the CPU, including any wait for a full queue
    iterations: int = 0  # subspace iterations, all matrices and steps
    fallbacks: int = 0  # matrix-steps that needed the exact SVD


class Live(NamedTuple):
    """Run-level values of the latest recorded steps (``Recorder.live``); steps are None before the first."""

    track_step: int | None  # the latest tracked step
    tracked: dict[str, float]  # geometry.capture.trajectory.LIVE_METRICS there: means over the tracked matrices
    snapshot_step: int | None  # the latest snapshot step
    snapshot: dict[str, float]  # sparsity_bf16 there (SPEC item 1), pooled over the tracked matrices' entries


class Recorder:
    """Records a training run into a geometry store (module docstring). A context manager.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained (unwrapped from DDP, DeepSpeed, torch.compile; a peft LoRA model is read as
        its merged weights). Every Linear weight, router and expert is recorded (``config.include`` and
        ``exclude`` narrow it); a warning says so when under half of the non-embedding parameters are.
    out_dir : path
        The store: a folder of Trainer-style ``checkpoint-N`` snapshots, ``base/`` and tracking files.
    config : RecorderConfig, optional
        What to record and how often.
    step : int
        The optimizer step the model is at now: 0 for a fresh run (its weights are the base W0); a resumed run
        passes its current step and W0 is read from the store, which must exist.

    Only rank 0 opens the store (``store`` is None on other ranks). Call ``step(t)`` after each optimizer step.

    Raises
    ------
    GeometryError
        No matrix selected, a store holding another run, an unwritable folder, or (at ``step``) a failed write.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geometry import Recorder, RecorderConfig
    >>> from geometry.capture.store import read_manifest
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> store = tempfile.mkdtemp() + "/store"
    >>> with Recorder(model, store, RecorderConfig(snapshot_every=5)) as rec:
    ...     for t in range(1, 11):
    ...         model(torch.randn(4, 16)).square().mean().backward()
    ...         opt.step(); opt.zero_grad()
    ...         rec.step(t)
    >>> read_manifest(store).steps
    [5, 10]
    """

    def __init__(self, model: nn.Module, out_dir: str | Path, config: RecorderConfig | None = None, *,
                 step: int = 0):
        self.config = cfg = config or RecorderConfig()
        self.model = unwrap(model)
        # a peft LoRA model: its adapted matrices, W0 + s B A (geometry.capture.adapters)
        self.full = matrices_of(self.model)
        self.params = select_parameters(self.full, cfg)
        measured: dict[str, int] = {}  # live parameter -> its entries measured (a stacked one: its experts')
        for n in self.params:
            measured[self.full.source[n]] = measured.get(self.full.source[n], 0) + math.prod(self.full.shapes[n])
        self.coverage = coverage(self.full.full.shapes, measured)  # what share of the model is measured
        if self.coverage.share_non_embedding() < 0.5 and is_writer():
            warnings.warn(f"Recorder: {self.coverage.line()}", stacklevel=2)
        self.shapes = {n: tuple(self.full.shapes[n]) for n in self.params}  # full shapes, also of shards
        self.writes = is_writer()  # this process writes the store (rank 0)
        self.collective = self.full.sharded(self.params)  # every rank takes part in the gathers
        self.tracker = SubspaceTracker(cfg.lock_k, cfg.oversample, tol=cfg.tol, eps=cfg.eps, max_iters=cfg.max_iters,
                                       seed=cfg.seed)
        self.store: Store | None = None
        self.done: int | None = None  # steps <= done were recorded by an earlier run
        self.stats = RecorderStats()
        self._w0: dict[str, torch.Tensor] = {}
        self._last: int | None = None  # last step seen
        self._snapped: int | None = None  # last step snapshotted
        self._batches = UpdateBatches(self.shapes, cfg.track_batch_mb)
        self._tracked: tuple[int, dict[str, Estimate]] | None = None  # the last tracked step's estimates (rank 0)
        self._previous: dict[str, Estimate] | None = None  # those of the tracked step before it
        self._live_tracked: tuple[int, dict[str, float]] | None = None  # run_values of _tracked, once asked
        self._unchanged: list[torch.Tensor] = []  # per matrix, entries unchanged at bf16 (a snapshot being taken)
        self._snapshot: tuple[int, dict[str, float]] | None = None
        if not (self.writes or self.collective):
            return  # another rank of an unsharded (DDP) run: rank 0 records the same weights
        base = ({n: w.to("cpu", copy=True).contiguous() for n, w in self.full.base_weights(self.params)}
                if step == 0 else None)
        err = None
        if self.writes:
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
        if self.writes or self.collective:
            self._record(step, snap, track)

    def live(self) -> Live:
        """Run-level values of the latest tracked step and snapshot (module docstring); empty on other ranks."""
        tracked = self._tracked
        if tracked is not None and (self._live_tracked is None or self._live_tracked[0] != tracked[0]):
            with torch.no_grad():
                self._live_tracked = (tracked[0], run_values(tracked[1], self._previous))
        t_step, t_values = self._live_tracked if tracked is not None else (None, {})
        s_step, s_values = self._snapshot if self._snapshot is not None else (None, {})
        return Live(t_step, dict(t_values), s_step, dict(s_values))

    def flush(self) -> None:
        """Wait until every queued write has landed (rank 0; a no-op elsewhere). Call it before saving a
        training checkpoint: a run resumed from that checkpoint then finds all its steps in the store."""
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        """Snapshot (and track, refined) the last step seen if not yet done; finish all writes."""
        if (self.writes or self.collective) and self._last is not None and self._snapped != self._last:
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

    # ---- opening (rank 0) ----

    def _open(self, out_dir: str | Path, base: dict[str, torch.Tensor] | None, step: int) -> None:
        """Open the store, check it against this run, keep W0. On any refusal the store is closed again."""
        cfg, hf_config = self.config, getattr(self.model, "config", None)
        try:
            self.store = Store.open(out_dir, base, settings=cfg.settings(), label=cfg.label,
                                    config=hf_config.to_dict() if hasattr(hf_config, "to_dict") else None,
                                    snapshot_bytes=sum(self._snapshot_nbytes(n) for n in self.params),
                                    queue_size=cfg.queue_size, on_error=cfg.on_error,
                                    chunk_steps=cfg.tracking_chunk)
        except (OSError, SafetensorError) as e:  # e.g. the disk filled up while the base was written
            raise GeometryError(f"cannot write the geometry store {out_dir}: {e}") from None
        try:
            self.done = self.store.last_step
            self._check_resume(out_dir, step)
            self._w0 = self._keep_base(base if base is not None else self.store.base())
            self._warm_start()
        except BaseException:
            store, self.store = self.store, None
            try:
                store.close()  # its writer thread must not outlive a recorder that was never made
            except GeometryError:
                pass  # a write error here would hide the refusal being raised
            raise

    def _check_resume(self, out_dir: str | Path, step: int) -> None:
        done = self.done
        if step == 0 and done is not None:  # splicing a new run onto the old one would mix two runs
            raise GeometryError(f"store {out_dir} already holds steps up to {done}; record a new run into "
                                "a new folder (a resumed run passes its current step)")
        if step > (done or 0):
            warnings.warn(f"store {out_dir} holds steps up to {done or 0}, the run resumes at step {step}: "
                          f"steps {(done or 0) + 1}..{step} stay missing (flush the recorder before saving "
                          "a training checkpoint)", stacklevel=4)

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
        for n, est in read_tracking(self.store.root, steps[-1]).items():
            if n in self.params:
                self.tracker.warm_start(n, est.v, self.shapes[n])

    # ---- one step ----

    def _record(self, step: int, snap: bool, track: bool) -> None:
        """Snapshot and/or track one step: one gather per matrix; rank 0 computes and writes."""
        copies: dict[str, torch.Tensor] = {}
        records: dict[str, Estimate] = {}
        self._batches.start()
        self._unchanged = []
        with torch.no_grad():
            err = self._visit(snap, track, copies, records)
            if err is None and track and self.writes:
                try:
                    t0 = time.perf_counter()
                    for batch in self._batches.rest():
                        records.update(self._track(batch, refine=snap))
                    self.stats.tracking_seconds += time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - raised by _agree, on every rank
                    err = e
            if err is None and self.writes:
                err = self._put(step, copies if snap else None, records if track else None)
            if err is None and self.writes:
                self._keep_live(step, snap, track, records)
        if snap:
            self._snapped = step
        self._agree(err)

    def _visit(self, snap: bool, track: bool, copies: dict, records: dict) -> Exception | None:
        """Gather every tracked matrix in turn (every rank takes part); on rank 0 copy it for the snapshot and put
        its update into the batches, tracking each batch as it fills. The first error is returned, not raised."""
        err = None
        for name, w in self.full.gather(self.params):  # (m, n) the full matrix, on rank 0 only
            if err is not None:
                continue  # keep taking part in the gathers: the other ranks wait in them
            try:
                t0 = time.perf_counter()
                w0 = self._w0[name].to(w.device, non_blocking=True) if snap or track else None
                if snap:
                    copies[name] = self._snapshot_copy(name, w)
                    self._unchanged.append((~changed_mask(w0, w)).sum())  # no sync: read in _keep_live
                t1 = time.perf_counter()
                if track:
                    batch = self._batches.add(name, w, w0)
                    if batch is not None:
                        records.update(self._track(batch, refine=snap))
                self.stats.snapshot_seconds += t1 - t0
                self.stats.tracking_seconds += time.perf_counter() - t1
            except Exception as e:  # noqa: BLE001 - raised by _agree, after the last gather
                err = e
        return err

    def _track(self, batch: Batch, refine: bool) -> dict[str, Estimate]:
        """One tracking step for a batch of same-shape updates; each Estimate cut to the reported K."""
        ests = self.tracker.update_many(batch.names, batch.d, refine=refine, fro=batch.fro)
        k, _ = self.tracker.dims(tuple(batch.d.shape[1:]))
        self.stats.iterations += sum(e.iters for e in ests)
        self.stats.fallbacks += sum(e.exact for e in ests)
        return {n: e.top(k) for n, e in zip(batch.names, ests, strict=True)}

    def _put(self, step: int, copies: dict | None, records: dict | None) -> GeometryError | None:
        try:
            if copies is not None:  # queued before tracking: a step's tracking never lands without its snapshot
                t0 = time.perf_counter()
                self.store.put_snapshot(step, copies)
                self.stats.snapshots += 1
                self.stats.snapshot_seconds += time.perf_counter() - t0
            if records is not None:
                t0 = time.perf_counter()
                self.store.put_tracking(step, records, self.config.tracking_torch_dtype())
                self.stats.tracked_steps += 1
                self.stats.tracking_seconds += time.perf_counter() - t0
        except GeometryError as e:
            return e
        return None

    def _keep_live(self, step: int, snap: bool, track: bool, records: dict[str, Estimate]) -> None:
        """Keep what ``live`` needs: the estimates of the last two tracked steps, the snapshot's sparsity."""
        if track:
            self._previous = self._tracked[1] if self._tracked is not None else None
            self._tracked = (step, records)
        if snap:
            total = sum(math.prod(s) for s in self.shapes.values())
            unchanged = sum(int(u) for u in self._unchanged)
            self._snapshot = (step, {"sparsity_bf16": unchanged / total})
        self._unchanged = []

    def _agree(self, err: BaseException | None) -> None:
        """Raise err; under a collective recorder other ranks raise rank 0's error too, so none waits forever."""
        msg = broadcast(None if err is None else f"{type(err).__name__}: {err}", self.collective)
        if err is not None:
            raise err
        if msg is not None:
            raise GeometryError(f"Recorder on rank 0: {msg}")

    def _snapshot_copy(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """In the dtype of the parameter as stored (an adapter's float32 merged weight: its base weight's)."""
        return w.to("cpu", self.config.snapshot_torch_dtype(self.params[name].dtype), copy=True).contiguous()

    def _snapshot_nbytes(self, name: str) -> int:
        dtype = self.config.snapshot_torch_dtype(self.params[name].dtype)
        return math.prod(self.shapes[name]) * torch.empty((), dtype=dtype).element_size()
