"""Full parameters of a sharded model, one matrix at a time, and which process writes.

The recorder needs each tracked matrix whole. How a process gets it depends on how it holds it:

    local    a plain tensor (one process, DDP, DataParallel): read as is, no communication
    dtensor  FSDP2 (``fully_shard``) or tensor parallel: ``p.full_tensor()`` all-gathers one matrix
    fsdp1    FullyShardedDataParallel(use_orig_params=True): ``FSDP.summon_full_params(unit, recurse=False,
             writeback=False, rank0_only=True)`` on the FSDP unit that owns it, one unit at a time
    zero3    DeepSpeed ZeRO-3 (``p.ds_id``): ``deepspeed.zero.GatheredParameters([p])``, one matrix at a time

Protocol: rank 0 writes; under a sharded layout every other rank takes part in the gathers and writes
nothing. A gather is a collective: every rank must ask for the same matrices in the same order at the
same steps, or training deadlocks. ``FullParameters.gather`` therefore visits the matrices in an order
fixed at construction (the model's own), and the recorder decides on every rank, from the step number
alone, whether a step is recorded. Unsharded weights are identical on every rank (DDP all-reduces the
gradients), so there rank 0 records alone and the other ranks need not even create a recorder.

DeepSpeed steps the optimizer inside ``engine.backward`` / ``engine.step``, so parameters move before
the Trainer's ``on_pre_optimizer_step`` / ``on_optimizer_step`` events mean anything. The recorder reads
parameters only at step end (``Recorder.step``, called from ``on_step_end``) and at the start, so its
update at step t is the difference between consecutive step-end states, whatever the engine.

Not covered: FSDP1 with ``use_orig_params=False`` (the model's parameters are hidden inside flat
parameters: refused with a clear error; pass ``use_orig_params=True``, the accelerate default, or use
FSDP2). ZeRO-3 runs in tests/test_zero3.py (deepspeed 0.19.8, two CPU processes over gloo); deepspeed is
imported only when a model holds ZeRO-3 parameters, and such a model without it is refused.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from geometry.errors import GeometryError

# Wrapper segments that FSDP1, activation checkpointing and torch.compile insert into parameter names.
_WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def _loaded(module: str, name: str):
    """A class of ``module`` if that module is imported, else None: no model can hold an instance of a class
    never imported, and importing torch.distributed.fsdp costs half a second that unsharded runs need not pay."""
    return getattr(sys.modules.get(module), name, None)


def _fsdp():
    return _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")


def rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else $RANK (set by launchers), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Whether this process writes the store: rank 0."""
    return rank() == 0


def broadcast(obj, collective: bool):
    """Rank 0's ``obj`` on every rank (a collective: every rank must call it); ``obj`` itself when not collective."""
    if not collective or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def clean_name(name: str) -> str:
    """A parameter or module name without wrapper segments: the name a single-process model gives it."""
    return _WRAPPERS.sub("", name).lstrip(".")


def layout(p: torch.Tensor) -> str:
    """How this process holds p: 'local', 'dtensor', 'zero3' (FSDP1 is a property of the module tree)."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(p, dtensor):
        return "dtensor"
    if hasattr(p, "ds_id"):
        return "zero3"
    return "local"


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of model is split across ranks. Cheap and local: no communication."""
    fsdp = _fsdp()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return True
    return any(layout(p) != "local" for p in model.parameters())


class FullParameters:
    """A model's parameters by clean name, with their full shapes, readable whole one matrix at a time.

    params: clean name -> the parameter as this process holds it (a shard, under sharding); shapes: clean
    name -> full shape. Creating one is a collective for FSDP1 (it gathers each unit once to learn the
    shapes), so under FSDP1 every rank must create it.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        raw = dict(model.named_parameters())
        flat = _loaded("torch.distributed.fsdp", "FlatParameter")
        if flat is not None and any(isinstance(p, flat) for p in raw.values()):
            raise GeometryError("Recorder: FSDP with use_orig_params=False hides the model's parameters; "
                                "wrap with use_orig_params=True or use FSDP2 (fully_shard)")
        self.params = {clean_name(n): p for n, p in raw.items()}
        self._layout = {n: layout(p) for n, p in self.params.items()}
        self._units: list[tuple[nn.Module, list[str]]] = []  # FSDP1: (unit, the clean names it owns)
        if _fsdp() is not None:
            self._find_units(raw)
        if any(v == "zero3" for v in self._layout.values()):
            _import_deepspeed()
        self.shapes = {n: self._full_shape(n, p) for n, p in self.params.items()}

    def linear_weights(self) -> list[str]:
        """Clean names of the weights of Linear layers (and GPT-2's transposed-Linear Conv1D)."""
        names = [f"{m}.weight" if m else "weight" for m, mod in self.model.named_modules()
                 if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"]
        return [n for n in map(clean_name, names) if n in self.params]

    def sharded(self, names: Iterable[str]) -> bool:
        """Whether reading these parameters needs every rank (a collective)."""
        return any(self._layout[n] != "local" for n in names)

    def base_weights(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights at step 0 (W0): those of the model now, read as ``gather`` reads them."""
        return self.gather(names)

    def gather(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for each name, on rank 0; other ranks take part in the gathers and get nothing.

        Every rank must exhaust the iterator. A tensor is valid until the next item (FSDP1 reshards the
        unit when it moves on, a local one is the live parameter): copy what you keep.
        """
        wanted = set(names)
        writer = is_writer()
        for unit, owned in self._units:  # FSDP1: one unit gathered at a time, in module order
            mine = [n for n in owned if n in wanted]
            if not mine:
                continue
            with _fsdp().summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
                if writer:
                    yield from ((n, self.params[n].detach()) for n in mine)
        for n in self.params:  # model order: the same on every rank
            if n not in wanted or self._layout[n] == "fsdp1":
                continue
            full = self._read(n)
            if writer and full is not None:
                yield n, full

    def _read(self, name: str) -> torch.Tensor | None:
        p, kind = self.params[name], self._layout[name]
        if kind == "dtensor":
            return p.detach().full_tensor()  # all-gather: every rank calls it
        if kind == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().clone() if is_writer() else None  # p.data is a shard again after the block
        return p.detach() if is_writer() else None

    def _find_units(self, raw: dict[str, nn.Parameter]) -> None:
        """FSDP1: each parameter belongs to the innermost FSDP unit whose prefix its raw name carries."""
        fsdp = _fsdp()
        units = [(prefix, m) for prefix, m in self.model.named_modules() if isinstance(m, fsdp)]
        if not units:
            return
        owned: dict[str, list[str]] = {prefix: [] for prefix, _ in units}
        for n in raw:
            prefix = max((u for u, _ in units if u == "" or n.startswith(u + ".")), key=len, default=None)
            if prefix is not None:
                owned[prefix].append(clean_name(n))
                self._layout[clean_name(n)] = "fsdp1"
        self._units = [(m, owned[prefix]) for prefix, m in units if owned[prefix]]
        self._fsdp1_shapes = {}
        for unit, names in self._units:  # all ranks see the full shapes: they select the same matrices
            with fsdp.summon_full_params(unit, recurse=False, writeback=False):
                self._fsdp1_shapes.update({n: self.params[n].shape for n in names})

    def _full_shape(self, name: str, p: torch.Tensor) -> torch.Size:
        kind = self._layout[name]
        if kind == "fsdp1":
            return self._fsdp1_shapes[name]
        if kind == "zero3":
            return torch.Size(p.ds_shape)
        return p.shape  # a DTensor's shape is the global one


def _import_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise GeometryError("Recorder: the model has DeepSpeed ZeRO-3 parameters but deepspeed cannot be "
                            "imported") from None
