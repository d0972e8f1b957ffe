"""Mixture-of-experts tensors as matrices (docs/metrics.md item 13), one rule for capture and offline.

A stacked expert tensor [E, a, b] holds E experts' matrices. Each is measured as a Linear weight
(out x in, so U and V mean what they mean for every other matrix), a fused gate/up split the way the
model splits it, and named as the model's own checkpoints name it (``...mlp.experts.3.gate_proj.weight``),
so a run recorded live, its saved per-expert checkpoints and a stacked save of the same weights give the
same rows.

Where transformers keeps a conversion between a model's checkpoints and its in-memory layout
(``transformers.conversion_mapping``: Qwen2/3-MoE, OLMoE, DeepSeek-V3, Mixtral, ...), the layout is read
from that mapping itself: its reverse (what ``save_pretrained`` runs) is applied to a small index tensor of
the stacked tensor's expert count, and the indices each per-expert output holds say which expert, which
rows (a contiguous part or every n-th) and whether transposed; the layout is checked to reproduce the
probe exactly. Where transformers saves the stacked tensor as it is (gpt-oss), the layout comes from
``STACKED``; any other stacked expert tensor is taken as [E, out, in] (transformers' in-memory layout)
with a note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import NamedTuple

import torch

EXPERTS = re.compile(r"(?:^|\.)experts\.(\d+)\.")  # the expert index in a per-expert name
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<leaf>[^.]+?)(?:\.weight)?$")


class ExpertPart(NamedTuple):
    """One expert's matrix inside a stacked tensor [E, a, b]."""

    name: str  # as the model's checkpoints name it
    tensor: str  # the stacked tensor
    expert: int
    index: slice  # along the stacked tensor's output axis: a contiguous part, or every n-th (interleaved)
    transposed: bool  # stored [E, in, out]: the matrix is the slab's transpose
    shape: tuple[int, int]  # (out, in)

    def of(self, stacked: torch.Tensor) -> torch.Tensor:
        """The expert's (out, in) matrix as a view of the stacked tensor (or of its slab [1, a, b] read alone,
        whose only expert is taken to be this one)."""
        slab = stacked[self.expert if stacked.shape[0] > 1 else 0]  # (a, b)
        return slab[:, self.index].mT if self.transposed else slab[self.index]


# Models whose checkpoints keep the stacked tensors as they are in memory, so transformers has no conversion:
# model_type -> leaf name -> (per-expert modules in order, transposed, interleaved). gpt-oss stores [E, in, out]
# and splits gate_up_proj's outputs as gate = [..., ::2], up = [..., 1::2] (GptOssExperts.forward).
STACKED = {
    "gpt_oss": {"gate_up_proj": (("gate_proj", "up_proj"), True, True), "down_proj": (("down_proj",), True, False)},
}
# Any other stacked tensor: transformers' in-memory layout, [E, out, in], gate_up_proj's halves gate first.
_DEFAULT = {"gate_up_proj": (("gate_proj", "up_proj"), False, False), "down_proj": (("down_proj",), False, False)}


def is_stacked(name: str, shape: Sequence[int]) -> bool:
    """Whether a tensor holds a stack of experts' matrices: 3-D, under an ``experts`` module."""
    return len(shape) == 3 and _STACKED.match(name) is not None and not name.endswith("bias")


def expert_of(name: str) -> int | None:
    """"model.layers.0.mlp.experts.3.gate_proj.weight" -> 3; None for a matrix outside the experts."""
    m = EXPERTS.search(name)
    return int(m.group(1)) if m else None


def split(shapes: Mapping[str, Sequence[int]], model=None, model_type: str | None = None
          ) -> tuple[dict[str, list[ExpertPart]], list[str]]:
    """The per-expert matrices of every stacked expert tensor among ``shapes``, and notes on the rules used.

    model: a live transformers model (capture), whose conversion mapping is used; else model_type (a
    checkpoint's config.json) names the mapping.
    """
    stacked = {n: tuple(s) for n, s in shapes.items() if is_stacked(n, s)}
    if not stacked:
        return {}, []
    if model is not None and model_type is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = _from_transformers(stacked, model, model_type)
    parts, assumed = {}, []
    for name, shape in stacked.items():
        if name in found:
            parts[name] = found[name]
            continue
        leaf = _STACKED.match(name)["leaf"]
        rule = STACKED.get(model_type or "", {}).get(leaf)
        if rule is None:
            rule = _DEFAULT.get(leaf, ((leaf,), False, False))
            assumed.append(name)
        parts[name] = _by_rule(name, shape, *rule)
    notes = [f"{len(assumed)} stacked expert tensors (e.g. {assumed[0]}) read as [E, out, in], gate_up_proj's "
             f"halves gate first (transformers' in-memory layout): no conversion known for model type "
             f"{model_type or '(no config.json)'}"] if assumed else []
    return parts, notes


def checkpoint_names(names: Sequence[str], model) -> dict[str, str]:
    """Live parameter name -> the name ``save_pretrained`` writes (transformers' renamings reversed, e.g.
    Mixtral's ``mlp.gate`` -> ``block_sparse_moe.gate``); names that keep theirs are left out."""
    holder = _holder(model, None)
    if holder is None or not names:
        return {}
    out = _revert(holder, {n: torch.tensor([i]) for i, n in enumerate(names)})  # each value: its name's index
    if out is None:
        return {}
    renamed = {}
    for new, value in out.items():
        old = names[int(value.reshape(-1)[0])] if value.numel() == 1 else None
        if old is not None and old != new:
            renamed[old] = new
    return renamed


def _by_rule(name: str, shape: tuple[int, int, int], modules: Sequence[str], transposed: bool,
             interleaved: bool) -> list[ExpertPart]:
    E, a, b = shape
    out_len, in_len = (b, a) if transposed else (a, b)
    n = len(modules)
    prefix = _STACKED.match(name)["prefix"]
    parts = []
    for e in range(E):
        for j, module in enumerate(modules):
            index = slice(j, None, n) if interleaved else slice(j * out_len // n, (j + 1) * out_len // n)
            parts.append(ExpertPart(f"{prefix}.{e}.{module}.weight", name, e, index, transposed,
                                    (out_len // n, in_len)))
    return parts


# ---- transformers' conversion mapping, probed ----

_PROBE = 60  # the probe's a and b: divisible by 2, 3, 4, 5, 6 (a fused tensor's parts)


def _holder(model, model_type: str | None):
    """What transformers' revert_weight_conversion needs: the live model, or the mapping of a model type."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    if model is not None:
        return model if hasattr(model, "config") and hasattr(model.config, "model_type") else None
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    return SimpleNamespace(_weight_conversions=mapping, config=None) if mapping else None


def _revert(holder, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(holder, dict(state))
    except Exception:  # noqa: BLE001 - an internal API: when it cannot serve, the stated default rule does
        return None


def _from_transformers(stacked: dict[str, tuple[int, int, int]], model, model_type: str | None
                       ) -> dict[str, list[ExpertPart]]:
    holder = _holder(model, model_type)
    if holder is None:
        return {}
    found = {}
    for name, (E, a, b) in stacked.items():
        out = _revert(holder, {name: torch.arange(E * _PROBE * _PROBE).reshape(E, _PROBE, _PROBE)})
        if not out or name in out:  # kept stacked: no conversion for it
            continue
        parts = [_decode(new, name, idx, (E, a, b)) for new, idx in out.items()]
        if all(p is not None for p in parts) and len(parts) % E == 0:
            found[name] = sorted(parts, key=lambda p: (p.expert, p.index.start))
    return found


def _decode(new: str, name: str, idx: torch.Tensor, shape: tuple[int, int, int]) -> ExpertPart | None:
    """The part of the stacked tensor that transformers' reverse conversion put in ``idx`` (indices into the
    probe [E, P, P]), scaled to the real shape; None when it is not one expert's rows, strided, maybe
    transposed (then the default rule serves)."""
    if idx.dim() != 2 or idx.dtype != torch.int64:
        return None
    P = _PROBE
    e, row, col = idx // (P * P), (idx // P) % P, idx % P
    whole = torch.arange(P)
    if idx.shape[1] == P and bool((col == whole).all()):
        transposed, rows = False, row[:, 0]  # the output axis's indices, in order
    elif idx.shape[0] == P and bool((col.mT == whole).all()):
        transposed, rows = True, row[0]
    else:
        return None
    if e.unique().numel() != 1:
        return None
    start, count = int(rows[0]), rows.numel()
    step = int(rows[1] - rows[0]) if count > 1 else 1
    if step < 1 or P % count:
        return None
    E, a, b = shape
    out_len, in_len = (b, a) if transposed else (a, b)
    n = P // count
    if out_len % n:
        return None
    index = slice(start // count * out_len // n, (start // count + 1) * out_len // n) if step == 1 \
        else slice(start, None, step)
    expected = ExpertPart(new, name, int(e[0, 0]), slice(start, None, step) if step > 1
                          else slice(start, start + count), transposed, (count, P))
    probe = torch.arange(E * P * P).reshape(E, P, P)
    if not torch.equal(expected.of(probe), idx):
        return None
    return ExpertPart(new, name, int(e[0, 0]), index, transposed, (out_len // n, in_len))
