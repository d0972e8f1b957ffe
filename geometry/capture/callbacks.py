"""transformers.TrainerCallback adapters: record a run, or constrain it (SPEC item 9).

Both use only the Trainer's callback events, so they work unchanged with ``transformers.Trainer``
and the TRL trainers built on it (SFTTrainer, GRPOTrainer, DistillationTrainer, ...):

    trainer = SFTTrainer(..., callbacks=[GeometryCallback("runs/sft/geometry")])

GeometryCallback also puts its run-level values into the Trainer's logs, so they reach every tracker of
``report_to`` (TensorBoard, W&B, trackio, MLflow, ...) at each ``logging_steps``, as ``geometry/<metric>``
(TensorBoard and W&B show them under ``train/geometry/``: their integrations prefix ``train/`` to the logs).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from geometry.capture.adapters import is_peft
from geometry.capture.distributed import is_sharded, is_writer
from geometry.capture.layout import check_writable
from geometry.capture.matrices import matrices_of, select_parameters, unwrap
from geometry.capture.recorder import Live, Recorder, RecorderConfig, RecorderStats
from geometry.errors import GeometryError


def _is_main_process(args, state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True)) and getattr(args, "process_index", 0) == 0


PREFIX = "geometry/"  # of the keys added to the Trainer's logs


def _work_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


class GeometryCallback(TrainerCallback):
    """Records the run into a geometry store at ``out_dir`` (geometry.capture.recorder, geometry.capture.store).

    Creating it checks that ``out_dir`` is writable (GeometryError, before any training); on_train_begin:
    a Recorder on the trainer's model (at ``state.global_step``: a resumed run continues its store; a full
    disk is refused here); on_step_end: ``rec.step(global_step)`` after each optimizer step, and a flush
    before the Trainer saves a checkpoint (a run resumed from it then misses no step); at the last step
    (``state.max_steps``, or on_train_end for a run stopped early): the final snapshot and close. The main
    process records; under FSDP / ZeRO-3 the other ranks take part in the gathers of the sharded weights
    (geometry.capture.distributed), under DDP they do nothing.

    log (default True): every time the Trainer logs, add the recorder's run-level values (Recorder.live) to
    its ``logs`` as ``geometry/<metric>``, each value once: at the latest tracked step, ``track_fro_norm``,
    ``track_stable_rank``, ``track_sim_prev_u``, ``track_sim_prev_v`` (means over the tracked matrices, as
    geometry.capture.trajectory.run_values); at the latest snapshot, ``sparsity_bf16`` (pooled). The Trainer
    calls its callbacks in list order and puts the report_to integrations before the user's callbacks, so a
    value added in this callback's own on_log would come after they wrote the logs. TrainerCallback events
    get no handle on the list, so at on_train_begin this callback takes its CallbackHandler from the calling
    frame and puts a one-event helper (on_log only) first; every other event keeps its order.

    Parameters
    ----------
    out_dir : path
        The store the Recorder writes (geometry.capture.recorder.Recorder).
    config : RecorderConfig, optional
        What to record and how often.
    log : bool
        Add the run-level values to the Trainer's logs (its experiment trackers).

    Raises
    ------
    GeometryError
        ``out_dir`` cannot be written (at creation), or the Recorder refuses the model (at on_train_begin).

    Examples
    --------
    >>> import tempfile
    >>> from geometry import GeometryCallback, RecorderConfig
    >>> cb = GeometryCallback(tempfile.mkdtemp() + "/geometry", RecorderConfig(snapshot_every=50))
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP

    Then ``geometry analyze OUT_DIR/base OUT_DIR -o out/`` measures its snapshots (tests/test_callbacks.py
    runs it through a real Trainer).
    """

    def __init__(self, out_dir: str | Path, config: RecorderConfig | None = None, *, log: bool = True):
        self.out_dir = Path(out_dir)
        self.config = config or RecorderConfig()
        self.log = log
        self.recorder: Recorder | None = None
        self.stats: RecorderStats | None = None  # the recorder's work, kept after training ends
        self._live = Live(None, {}, None, {})  # the values of a closed recorder (logged after its last step)
        self._logged: tuple[int | None, int | None] = (None, None)  # the tracked and snapshot steps logged
        self._merger = _LogMerger(self)
        self._handler: CallbackHandler | None = None
        if is_writer():
            check_writable(self.out_dir)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise GeometryError("GeometryCallback: the trainer passed no model to on_train_begin")
        if Path(args.output_dir).resolve() == self.out_dir.resolve():
            # the Trainer's own checkpoint-N folders (all weights) would collide with the store's
            raise GeometryError(f"GeometryCallback: store {self.out_dir} is the trainer's output_dir; "
                                "use a subfolder such as output_dir/geometry")
        if not _is_main_process(args, state) and not is_sharded(unwrap(model)):
            return  # unsharded weights are the same on every rank: the main process records them
        self.recorder = Recorder(model, self.out_dir, self.config, step=state.global_step)
        self._live, self._logged = Live(None, {}, None, {}), (None, None)
        if self.log and self.recorder.writes:
            self._put_merger_first(args)

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.step(state.global_step)
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                self._finish()  # before the Trainer's last logs, so that they carry the final snapshot
            elif control.should_save:  # the Trainer saves its checkpoint right after this event
                self.recorder.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._finish()
        if self._handler is not None:
            self._handler.callbacks = [c for c in self._handler.callbacks if c is not self._merger]
            self._handler = None

    def _finish(self) -> None:
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()
            self.stats, self._live = rec.stats, rec.live()

    def _merge(self, state, logs: dict | None) -> None:
        """Add the values not logged yet to ``logs`` (and to the Trainer's log_history entry of it)."""
        if logs is None:
            return
        live = self.recorder.live() if self.recorder is not None else self._live
        new = {}
        if live.track_step is not None and live.track_step != self._logged[0]:
            new.update(live.tracked)
        if live.snapshot_step is not None and live.snapshot_step != self._logged[1]:
            new.update(live.snapshot)
        self._logged = (live.track_step, live.snapshot_step)
        new = {PREFIX + k: v for k, v in new.items()}
        logs.update(new)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(new)  # Trainer.log appended a copy of logs before calling on_log

    def _put_merger_first(self, args) -> None:
        frame, handler = sys._getframe(1), None
        while frame is not None and handler is None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, CallbackHandler) and any(c is self for c in obj.callbacks):
                handler = obj
            frame = frame.f_back
        if handler is None:
            if getattr(args, "report_to", None):  # a tracker would miss the values: say so
                warnings.warn("GeometryCallback: not called by a transformers CallbackHandler; its values are not "
                              "added to the trainer's logs", stacklevel=3)
            return
        # a new list: the handler is iterating over the old one (call_event) and must not see the change
        handler.callbacks = [self._merger, *(c for c in handler.callbacks if c is not self._merger)]
        self._handler = handler


class _LogMerger(TrainerCallback):
    """GeometryCallback's on_log, run first of all callbacks (GeometryCallback's docstring)."""

    def __init__(self, owner: GeometryCallback):
        self.owner = owner

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.owner._merge(state, logs)


class GradientProjectionCallback(TrainerCallback):
    """SPEC item 9, the causal test: from a chosen step, keep every gradient inside the update's subspace.

    At step t0 = round(start_frac * max_steps), for each tracked matrix, the exact SVD of the cumulative
    update D_t0 = W_t0 - W0 gives its top-K singular subspaces U_K (m, K), V_K (n, K), fixed from then on.
    Before every later optimizer step (Trainer event on_pre_optimizer_step, after gradient clipping):

        side="right":  G <- G V_K V_K^T      "left":  G <- U_K U_K^T G      "both":  G <- U_K U_K^T G V_K V_K^T

    With plain SGD (no weight decay) the update after t0 then lies in that subspace exactly,
    (D_T - D_t0)(I - V_K V_K^T) = 0. Adam rescales each entry after the projection, so there the gradients,
    not the updates, are constrained (as in the paper's experiment). W0 is kept on the CPU until t0.

    Parameters
    ----------
    start_frac : float
        t0 as a share of ``max_steps``, in (0, 1): the paper projects from 20%.
    lock_k : int
        K, the rank of the subspace the gradients are kept in.
    side : {"right", "left", "both"}
        Which side of G is projected.
    include, exclude : tuple of regexes
        The matrices projected (default: every Linear weight, router and expert, as the Recorder's).

    Raises
    ------
    GeometryError
        Invalid settings (at creation); a resumed run, sharded or DeepSpeed-managed gradients, or a peft model
        (at on_train_begin).

    Examples
    --------
    >>> from geometry import GradientProjectionCallback
    >>> cb = GradientProjectionCallback(start_frac=0.2, lock_k=16)
    >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()  # doctest: +SKIP
    """

    def __init__(self, start_frac: float = 0.2, lock_k: int = 16, side: str = "right",
                 include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
        if not 0.0 < start_frac < 1.0:
            raise GeometryError(f"GradientProjectionCallback: start_frac must be in (0, 1), not {start_frac}")
        if side not in ("right", "left", "both") or lock_k < 1:
            raise GeometryError("GradientProjectionCallback: side is 'right', 'left' or 'both'; lock_k >= 1")
        self.start_frac, self.lock_k, self.side = start_frac, lock_k, side
        self.select = RecorderConfig(include=include, exclude=exclude)
        self.start_step: int | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._w0: dict[str, torch.Tensor] = {}
        self.bases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None  # name -> (U_K, V_K)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:  # W0 (and the fixed subspaces) are not part of the Trainer's checkpoint
            raise GeometryError("GradientProjectionCallback: cannot resume a run mid-way; start from step 0")
        if getattr(args, "deepspeed", None) or is_sharded(unwrap(model)):
            # p.grad is a shard (FSDP) or absent before on_pre_optimizer_step (DeepSpeed steps in backward)
            raise GeometryError("GradientProjectionCallback: sharded or DeepSpeed-managed gradients are not "
                                "supported; use a single process or DDP")
        if is_peft(model) or is_peft(unwrap(model)):
            # what trains is the adapters' factors A and B, not W: SPEC 9 fixes the subspace of W's update and
            # projects W's gradient, which a LoRA model does not have
            raise GeometryError("GradientProjectionCallback: peft (LoRA) models are not supported: their gradients "
                                "are the adapters' factors, not the weights' (train the full weights to project, "
                                "or measure the LoRA run with GeometryCallback)")
        self.start_step = max(1, round(self.start_frac * state.max_steps))
        matrices = matrices_of(model)
        self._params = select_parameters(matrices, self.select)
        self._view = matrices.view  # an expert's matrix inside its stacked parameter (or gradient)
        self._w0 = {n: self._view(n, p.detach()).to("cpu", copy=True) for n, p in self._params.items()}
        self.bases = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.start_step is None or state.global_step < self.start_step:
            return
        if self.bases is None:
            self.bases = self._fix_subspaces()
        with torch.no_grad():
            for name, (U, V) in self.bases.items():
                p = self._params[name]
                if p.grad is not None:  # in float32, or float64 for a float64 model
                    g = self._view(name, p.grad)  # (m, n), a view: projected in place
                    g.copy_(self._project(g.to(_work_dtype(p)), U, V))

    def on_train_end(self, args, state, control, **kwargs):
        self._w0, self._params, self.bases = {}, {}, None

    def _project(self, g: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None) -> torch.Tensor:
        if V is not None:
            g = (g @ V) @ V.mT  # (m, n) right projection
        if U is not None:
            g = U @ (U.mT @ g)  # (m, n) left projection
        return g

    def _fix_subspaces(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        bases = {}
        with torch.no_grad():
            for name, p in self._params.items():
                d = self._view(name, p.detach()).double() - self._w0[name].to(p.device).double()  # (m, n) D_t0
                if not torch.any(d):
                    continue  # frozen or not yet moved: no subspace to keep it in; leave its gradient alone
                U, _, Vh = torch.linalg.svd(d, full_matrices=False)
                k, dtype = min(self.lock_k, min(d.shape)), _work_dtype(p)
                bases[name] = (U[:, :k].to(dtype) if self.side in ("left", "both") else None,
                               Vh[:k].mT.to(dtype) if self.side in ("right", "both") else None)
        self._w0 = {}  # no longer needed: free the CPU copy
        return bases
