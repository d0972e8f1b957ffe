"""PEFT LoRA adapter checkpoints read as the weights they stand for: W_t = W0 + scale * B A.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained``
and a Trainer's ``checkpoint-N`` of a PEFT model hold) is opened against the run's base. Each adapted Linear
``<name>`` (factors ``base_model.model.<name>.lora_A.weight`` (r, n) and ``.lora_B.weight`` (m, r)) is read
as ``<name>.weight`` of the base plus its update, so rows carry the base weight's name and line up with
merged-weight checkpoints of the same training. Scaling as peft's LoraLayer: lora_alpha / r, or with
use_rslora lora_alpha / sqrt(r) (Kalajdzievski 2023); r from the factors' shapes (so rank_pattern is
honoured), alpha per module from alpha_pattern. The update is formed densely in float64 (exact: no float32
rounding of W0 + D enters D); a factored path (spectra from QR of the factors) is not built yet.
DoRA (use_dora) and other adapter types are refused with one line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from geometry.errors import GeometryError
from geometry.offline.files import SafetensorsFile
from geometry.offline.locate import read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# peft's saved names: the adapter name is dropped on save, but a raw state dict keeps it (".default")
_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter(d: Path) -> bool:
    return d.is_dir() and (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file()


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module whose name ends with it (or a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class AdapterSource:
    """A LoRA adapter checkpoint seen as a TensorSource of the full model: base tensors, with W0 + scale B A
    in place of each adapted weight (float64). ``adapted``: the base names that carry an update."""

    def __init__(self, d: Path, base):

        cfg = read_json(d / ADAPTER_CONFIG) or {}
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise GeometryError(f"{d}: adapter type {kind} is not supported (LoRA adapters only; merge it and "
                                "analyze the merged weights)")
        if cfg.get("use_dora"):
            raise GeometryError(f"{d}: DoRA adapters are not supported (the update is not B A alone; merge the "
                                "adapter and analyze the merged weights)")
        if cfg.get("fan_in_fan_out"):
            raise GeometryError(f"{d}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        self.label, self.base, self.config = str(d), base, base.config
        self._file = SafetensorsFile(d / ADAPTER_WEIGHTS)
        self.notes: list[str] = []
        pairs: dict[str, dict[str, str]] = {}
        ignored = []
        for key in self._file.meta:
            m = _FACTOR.match(key)
            if m is None:
                ignored.append(key)
                continue
            pairs.setdefault(m["module"], {})[m["side"]] = key
        self._factors: dict[str, tuple[str, str, float]] = {}  # base name -> (A key, B key, scale)
        alpha_default = cfg.get("lora_alpha", 8)
        for module, sides in sorted(pairs.items()):
            name = self._base_name(module)
            if name is None or set(sides) != {"A", "B"}:
                ignored.extend(sides.values())
                continue
            (r, n), (m_, r_b) = self._file.meta[sides["A"]][0], self._file.meta[sides["B"]][0]
            if r != r_b or tuple(base.shape(name)) != (m_, n):
                raise GeometryError(f"{d}: LoRA factors of {module} have shapes ({r}, {n}) and ({m_}, {r_b}), "
                                    f"which do not make the base's {tuple(base.shape(name))}")
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default)
            self._factors[name] = (sides["A"], sides["B"], lora_scale(alpha, r, bool(cfg.get("use_rslora"))))
        if not self._factors:
            raise GeometryError(f"{d}: no LoRA factor pair matches a weight of the base {base.label}")
        if ignored:
            self.notes.append(f"{d}: ignored {len(ignored)} adapter tensors that are not LoRA factors of a base "
                              f"weight, e.g. {sorted(ignored)[0]}")

    def _base_name(self, module: str) -> str | None:
        for name in (f"{module}.weight", f"model.{module}.weight", f"{module.removeprefix('model.')}.weight"):
            if name in self.base:
                return name
        return None

    @property
    def adapted(self) -> set[str]:
        return set(self._factors)

    def __repr__(self) -> str:
        return f"AdapterSource({self.label!r}, {len(self._factors)} adapted weights)"

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float64 if name in self._factors else self.base.dtype(name)

    def update(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of the update D = L R (L = scale B (m, r), R = A (r, n)), float64."""
        a_key, b_key, scale = self._factors[name]
        A, B = self._file.read(a_key, None).double(), self._file.read(b_key, None).double()
        return scale * B, A

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        W = self.base.read(name, rows)
        if name not in self._factors:
            return W
        L, R = self.update(name)
        return W.double() + (L if rows is None else L[rows]) @ R  # (rows, n)
