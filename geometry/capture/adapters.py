"""LoRA adapters (peft) seen as the weights they update: W_t = W0 + D_t, D_t = s B_t A_t (Hu et al. 2021).

For each Linear layer a peft LoRA adapter wraps, the recorder tracks the update of the frozen base
weight W0 (m, n) (``base_layer.weight``) by the active adapter, with peft's own scaling and orientation:

    D = transpose(B A, fan_in_fan_out) * s,    B = lora_B.weight (m, r),  A = lora_A.weight (r, n),
    s = lora_alpha / r,  or lora_alpha / sqrt(r) under rsLoRA (Kalajdzievski 2023)  (``module.scaling``)

as peft's ``get_delta_weight`` computes it, here in float32 (adapters train in float32 by default; a
bf16 base is upcast exactly). Rows carry the base weight's name in the base model
(``model.layers.0.self_attn.q_proj.weight``), so that an adapter run and a merged-weight run line up.
The merged weight W0 + D is formed in float32 for the tracking (its D then differs from s B A by float32
rounding of W0, ~1e-7 |W0| per entry) and stored in the base weight's dtype in snapshots, as a merge would.

Refused with one GeometryError line: DoRA (its update rescales columns of W0 + s B A: not a product of the
adapter's factors), other adapter types (IA3, LoHa, LoKr, AdaLoRA, ...), several active adapters at once,
and adapters on sharded (FSDP, ZeRO-3) models. LoRA on embeddings or convolutions is not tracked.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from geometry.capture.distributed import layout
from geometry.errors import GeometryError


def is_peft(model: nn.Module) -> bool:
    """Whether model is a peft PeftModel (peft is imported only if the model's own code imported it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


class AdapterParameters:
    """A PEFT model's LoRA-adapted matrices by base weight name, read as merged weights W0 + D (module docstring).

    The interface of geometry.capture.distributed.FullParameters that the recorder uses: ``params`` (name ->
    the frozen base weight), ``shapes``, ``linear_weights``, ``sharded``, ``gather`` (W_t, float32) and
    ``base_weights`` (W0).
    """

    def __init__(self, model: nn.Module):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        for name, cfg in model.peft_config.items():
            kind = getattr(cfg.peft_type, "value", cfg.peft_type)
            if kind != "LORA":
                raise GeometryError(f"Recorder: peft adapter type {kind} ({name}) is not supported; LoRA (and "
                                    "rsLoRA) adapters are, or record a model with the adapter merged")
        self.layers: dict[str, tuple[nn.Module, str]] = {}  # base weight name -> (LoRA layer, adapter name)
        for prefix, m in model.get_base_model().named_modules():
            if not isinstance(m, BaseTunerLayer):
                continue
            if not isinstance(m, LoraLayer):
                raise GeometryError(f"Recorder: peft adapter {type(m).__module__}.{type(m).__name__} at {prefix} "
                                    "is not supported; LoRA (and rsLoRA) adapters are")
            active = [a for a in m.active_adapters if a in m.lora_A]
            if not active:
                continue
            if len(active) > 1:
                raise GeometryError(f"Recorder: {prefix} has {len(active)} active LoRA adapters; activate one")
            if m.use_dora.get(active[0], False):
                raise GeometryError(f"Recorder: {prefix} is a DoRA adapter, which is not supported (its update "
                                    "is not s B A); record a model with the adapter merged")
            base = m.get_base_layer()
            if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":
                self.layers[f"{prefix}.weight"] = (m, active[0])
        if not self.layers:
            raise GeometryError("Recorder: the peft model has no active LoRA adapter on a Linear layer")
        self.params = {n: m.get_base_layer().weight for n, (m, _) in self.layers.items()}
        if any(layout(p) != "local" for p in model.parameters()):
            raise GeometryError("Recorder: LoRA adapters on a sharded (FSDP, ZeRO-3) model are not supported; "
                                "use one process or DDP")
        self.shapes = {n: p.shape for n, p in self.params.items()}

    def linear_weights(self) -> list[str]:
        return list(self.params)

    def sharded(self, names: Iterable[str]) -> bool:
        return False

    def base_weights(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, W0): the frozen base weights."""
        wanted = set(names)
        yield from ((n, p.detach()) for n, p in self.params.items() if n in wanted)

    def gather(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, W_t = W0 + D_t) in float32, one matrix at a time."""
        wanted = set(names)
        for n, p in self.params.items():
            if n in wanted:
                yield n, p.detach().float() + self.update(n)

    def update(self, name: str) -> torch.Tensor:
        """D = s B A (m, n) in float32, in the base weight's orientation (peft's get_delta_weight)."""
        m, a = self.layers[name]
        d = m.lora_B[a].weight.detach().float() @ m.lora_A[a].weight.detach().float()  # (m, r) @ (r, n)
        return (d.mT if m.fan_in_fan_out else d) * m.scaling[a]
