"""transformers.TrainerCallback adapters: record a run, or constrain it (SPEC item 9).

Both use only the Trainer's callback events, so they work unchanged with ``transformers.Trainer``
and the TRL trainers built on it (SFTTrainer, GRPOTrainer, DistillationTrainer, ...):

    trainer = SFTTrainer(..., callbacks=[GeometryCallback("runs/sft/geometry")])
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from geometry.capture.distributed import is_sharded, is_writer
from geometry.capture.layout import check_writable
from geometry.capture.recorder import Recorder, RecorderConfig, RecorderStats, select_parameters, unwrap
from geometry.errors import GeometryError


def _is_main_process(args, state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True)) and getattr(args, "process_index", 0) == 0


def _work_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


class GeometryCallback(TrainerCallback):
    """Records the run into a geometry store at ``out_dir`` (geometry.capture.recorder, geometry.capture.store).

    Creating it checks that ``out_dir`` is writable (GeometryError, before any training); on_train_begin:
    a Recorder on the trainer's model (at ``state.global_step``: a resumed run continues its store; a full
    disk is refused here); on_step_end: ``rec.step(global_step)`` after each optimizer step, and a flush
    before the Trainer saves a checkpoint (a run resumed from it then misses no step); on_train_end: the
    final snapshot and close. The main process records; under FSDP / ZeRO-3 the other ranks take part in
    the gathers of the sharded weights (geometry.capture.distributed), under DDP they do nothing.
    """

    def __init__(self, out_dir: str | Path, config: RecorderConfig | None = None):
        self.out_dir = Path(out_dir)
        self.config = config or RecorderConfig()
        self.recorder: Recorder | None = None
        self.stats: RecorderStats | None = None  # the recorder's work, kept after training ends
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

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.step(state.global_step)
            if control.should_save:  # the Trainer saves its checkpoint right after this event
                self.recorder.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()
            self.stats = rec.stats


class GradientProjectionCallback(TrainerCallback):
    """SPEC item 9, the causal test: from a chosen step, keep every gradient inside the update's subspace.

    At step t0 = round(start_frac * max_steps), for each tracked matrix, the exact SVD of the cumulative
    update D_t0 = W_t0 - W0 gives its top-K singular subspaces U_K (m, K), V_K (n, K), fixed from then on.
    Before every later optimizer step (Trainer event on_pre_optimizer_step, after gradient clipping):

        side="right":  G <- G V_K V_K^T      "left":  G <- U_K U_K^T G      "both":  G <- U_K U_K^T G V_K V_K^T

    With plain SGD (no weight decay) the update after t0 then lies in that subspace exactly,
    (D_T - D_t0)(I - V_K V_K^T) = 0. Adam rescales each entry after the projection, so there the gradients,
    not the updates, are constrained (as in the paper's experiment). W0 is kept on the CPU until t0.
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
        self.start_step = max(1, round(self.start_frac * state.max_steps))
        self._params = select_parameters(unwrap(model), self.select)
        self._w0 = {n: p.detach().to("cpu", copy=True) for n, p in self._params.items()}
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
                    p.grad.copy_(self._project(p.grad.to(_work_dtype(p)), U, V))

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
                d = p.detach().double() - self._w0[name].to(p.device).double()  # (m, n) D_t0 in float64
                if not torch.any(d):
                    continue  # frozen or not yet moved: no subspace to keep it in; leave its gradient alone
                U, _, Vh = torch.linalg.svd(d, full_matrices=False)
                k, dtype = min(self.lock_k, min(d.shape)), _work_dtype(p)
                bases[name] = (U[:, :k].to(dtype) if self.side in ("left", "both") else None,
                               Vh[:k].mT.to(dtype) if self.side in ("right", "both") else None)
        self._w0 = {}  # no longer needed: free the CPU copy
        return bases
