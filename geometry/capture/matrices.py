"""A live model's matrices as its checkpoints name them: stacked experts split per expert, names as saved.

The recorder measures what an offline analysis of the run's saved checkpoints measures (docs/metrics.md
item 13): every Linear weight and router, and each expert of a stacked expert parameter [E, a, b] as its
own (out, in) matrix (geometry.experts), each under the name ``save_pretrained`` writes (transformers'
renamings reversed: Mixtral's live ``mlp.experts.gate_up_proj`` is saved as ``block_sparse_moe.experts.N.w1``
and ``.w3``). ``Matrices`` wraps the parameters as geometry.capture.distributed.FullParameters (or the LoRA
view geometry.capture.adapters.AdapterParameters) holds them and offers the same interface by matrix name;
a stacked parameter is gathered once a step and its experts are views of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from geometry import experts
from geometry.capture.adapters import AdapterParameters, is_peft
from geometry.capture.config import RecorderConfig
from geometry.capture.distributed import FullParameters
from geometry.errors import GeometryError
from geometry.selection import choose, is_norm, module_of

# Non-Linear modules whose 2-D weight is a matrix of the model: MoE routers (Qwen3MoeTopKRouter, ...).
ROUTER_MODULES = frozenset({"gate", "router"})


class Matrices:
    """The measurable matrices of ``full`` by checkpoint name (module docstring).

    params: name -> the parameter holding the matrix (a stacked parameter for an expert); shapes: name ->
    the matrix's (out, in) shape; parts: name -> its ExpertPart, for experts; notes: the rules used.
    """

    def __init__(self, full, model: nn.Module | None = None):
        self.full = full
        model = model if model is not None else getattr(full, "model", None)
        live = {n: tuple(s) for n, s in full.shapes.items()}
        stacked, self.notes = experts.split(live, model=_base_model(model))
        renamed = experts.checkpoint_names([n for n, s in live.items() if len(s) == 2], _base_model(model))
        self.source: dict[str, str] = {}  # matrix name -> live parameter name
        self.parts: dict[str, experts.ExpertPart] = {}
        self.shapes: dict[str, torch.Size] = {}
        for n, shape in live.items():
            if n in stacked:
                for p in stacked[n]:
                    self.source[p.name], self.parts[p.name], self.shapes[p.name] = n, p, torch.Size(p.shape)
            else:
                name = renamed.get(n, n)
                self.source[name], self.shapes[name] = n, torch.Size(shape)
        self.params = {n: full.params[p] for n, p in self.source.items()}
        self._linear = {renamed.get(n, n) for n in full.linear_weights()}
        self._linear |= {n for n, p in self.source.items() if len(self.shapes[n]) == 2 and p.endswith(".weight")
                         and module_of(p) in ROUTER_MODULES and not is_norm(p)}
        self._linear |= set(self.parts)

    def linear_weights(self) -> list[str]:
        """The matrices of Linear layers, routers and experts (geometry.selection's ``linear``)."""
        return [n for n in self.source if n in self._linear]

    def live_names(self, names: Iterable[str]) -> list[str]:
        """The live parameters holding these matrices, each once, in model order."""
        wanted = {self.source[n] for n in names}
        return [n for n in self.full.params if n in wanted]

    def sharded(self, names: Iterable[str]) -> bool:
        return self.full.sharded(self.live_names(names))

    def view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The matrix ``name`` inside its parameter's tensor (the parameter, its gradient, a gathered copy)."""
        part = self.parts.get(name)
        return tensor if part is None else part.of(tensor)

    def gather(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, matrix) as ``full.gather`` gives its parameters (rank 0 only; valid until the next item)."""
        yield from self._split(names, self.full.gather)

    def base_weights(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._split(names, self.full.base_weights)

    def _split(self, names: Iterable[str], read) -> Iterator[tuple[str, torch.Tensor]]:
        by_live: dict[str, list[str]] = {}
        for n in names:
            by_live.setdefault(self.source[n], []).append(n)
        for live, tensor in read(self.live_names([m for ms in by_live.values() for m in ms])):
            for n in by_live[live]:
                yield n, self.view(n, tensor)


def _base_model(model: nn.Module | None) -> nn.Module | None:
    """The transformers model whose conversion mapping names the checkpoints (a peft model's base model)."""
    if model is not None and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / DeepSpeed (``.module``) and torch.compile (``_orig_mod``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            return model


def matrices_of(model: nn.Module) -> Matrices:
    """A model's matrices by checkpoint name (geometry.capture.matrices), of its LoRA view for a peft model."""
    model = unwrap(model)
    return Matrices(AdapterParameters(model) if is_peft(model) else FullParameters(model), model)


def select_parameters(model: nn.Module | Matrices, cfg: RecorderConfig) -> dict[str, nn.Parameter]:
    """The tracked matrices by name, each with the parameter holding it (geometry.selection: Linear weights,
    routers and experts; embeddings only when asked).

    Names and shapes are those of the full model's checkpoints: wrapper prefixes (FSDP1, torch.compile) are
    dropped, a shard is judged by its full shape (geometry.distributed), so every rank selects the same matrices,
    and a stacked expert parameter gives one matrix an expert (geometry.experts).
    """
    full = model if isinstance(model, Matrices) else matrices_of(model)
    shapes = full.shapes
    names = sorted(choose(shapes, include=cfg.include, exclude=cfg.exclude, embeddings=cfg.embeddings,
                          linear=full.linear_weights()))
    if not names:
        raise GeometryError("Recorder: no parameter matches the include/exclude patterns")
    empty = [n for n in names if shapes[n].numel() == 0]
    if empty:
        raise GeometryError(f"Recorder: parameter {empty[0]} is empty")
    return {n: full.params[n] for n in names}
