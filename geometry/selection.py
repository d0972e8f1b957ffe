"""Which matrices are measured (SPEC "Which matrices"), and how a parameter name reads.

One rule for offline analysis (names and shapes from a checkpoint's header) and for training-time
capture (a live model, where the Linear layers are known): every 2-D weight of a Linear layer;
embeddings and lm_head only when asked; ``include`` / ``exclude`` regexes (re.search) on the name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple

from geometry.errors import GeometryError

# Input/output embeddings across HF architectures; left out unless asked for.
EMBED_MODULES = frozenset(
    "embed_tokens tok_embeddings wte wpe embed_in embed_out lm_head shared word_embeddings "
    "position_embeddings token_type_embeddings embed_positions".split()
)
_DIGITS = re.compile(r"(\d+)")


def module_of(name: str) -> str:
    """"model.layers.3.self_attn.q_proj.weight" -> "q_proj"."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def layer_of(name: str) -> int | None:
    """"model.layers.3.self_attn.q_proj.weight" -> 3; None when the name holds no block index."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def natural_order(names: Iterable[str]) -> list[str]:
    """Names sorted so that layer 10 comes after layer 9."""
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in _DIGITS.split(n)])


def as_patterns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    """A regex or a sequence of them as a checked tuple (one string is one pattern)."""
    patterns = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise GeometryError(f"invalid {what} regex {p!r}: {e}") from None
    return patterns


def matches(name: str, patterns: str | Sequence[str]) -> bool:
    """Whether some pattern (re.search) matches the name."""
    return any(re.search(p, name) for p in as_patterns(patterns, "name"))


def is_norm(name: str) -> bool:
    return "norm" in name.lower() or re.search(r"(^|\.)ln_", name) is not None


def choose(shapes: Mapping[str, Sequence[int]], *, include: Sequence[str] = (), exclude: Sequence[str] = (),
           embeddings: bool = False, linear: Collection[str] | None = None) -> list[str]:
    """The names to measure, in natural order.

    shapes: every tensor's shape by name. linear: the weights of Linear layers where the model is at hand
    (capture); None for a checkpoint, where a Linear weight is a 2-D ``*.weight`` that is not a norm.
    A name some ``include`` matches is taken even if it is an embedding or lacks the ``.weight`` suffix;
    ``exclude`` always wins. Non-matrices are never taken.
    """
    include, exclude = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    chosen = []
    for name, shape in shapes.items():
        if len(shape) != 2 or (include and not matches(name, include)) or matches(name, exclude):
            continue
        if linear is not None:
            if not include and name not in linear:
                continue
        elif is_norm(name) or (not include and not name.endswith(".weight")):
            continue
        if module_of(name) in EMBED_MODULES and not (embeddings or include):
            continue
        chosen.append(name)
    return natural_order(chosen)


LEFT_OUT_KINDS = ("embeddings", "norms", "biases", "others")


def kind_of(name: str, shape: Sequence[int]) -> str:
    """What a tensor not measured is, for the account of what was left out."""
    if module_of(name) in EMBED_MODULES:
        return "embeddings"
    if is_norm(name):
        return "norms"
    if name.endswith("bias") or len(shape) < 2:
        return "biases" if name.endswith("bias") else "others"
    return "others"


class Coverage(NamedTuple):
    """The share of a model's parameters measured, and what was left out by kind (docs/metrics.md,
    "Which matrices")."""

    total: int  # parameters (entries) of every tensor
    measured: int  # entries of the measured matrices
    embeddings: int  # entries of the embedding tensors (measured or not)
    left_out: dict[str, tuple[int, int]]  # kind -> (tensors, entries) not measured

    def share(self) -> float:
        return self.measured / self.total if self.total else 1.0

    def share_non_embedding(self) -> float:
        """Of the parameters outside the embeddings (what post-training mostly moves), the share measured."""
        rest = self.total - self.embeddings
        left = sum(n for k, (_, n) in self.left_out.items() if k != "embeddings")
        return 1.0 - left / rest if rest else 1.0

    def line(self) -> str:
        """"measured 1,234 of 5,678 parameters (21.7%; 30.1% of the non-embedding ones); left out: ..."."""
        left = "; ".join(f"{k} {t} tensors ({n:,} parameters)" for k, (t, n) in self.left_out.items() if t)
        return (f"measured {self.measured:,} of {self.total:,} parameters ({100 * self.share():.1f}%; "
                f"{100 * self.share_non_embedding():.1f}% of the non-embedding ones)"
                + (f"; left out: {left}" if left else ""))

    def as_dict(self) -> dict:
        return {"total_parameters": self.total, "measured_parameters": self.measured,
                "embedding_parameters": self.embeddings, "share_measured": self.share(),
                "share_measured_non_embedding": self.share_non_embedding(),
                "left_out": {k: {"tensors": t, "parameters": n} for k, (t, n) in self.left_out.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Coverage:
        return cls(d["total_parameters"], d["measured_parameters"], d["embedding_parameters"],
                   {k: (v["tensors"], v["parameters"]) for k, v in d["left_out"].items()})


def coverage(shapes: Mapping[str, Sequence[int]], measured: Mapping[str, int]) -> Coverage:
    """shapes: every tensor of the model; measured: tensor name -> its entries measured (all of a matrix, the
    measured experts' share of a stacked tensor). A tensor with nothing measured is left out, by kind."""
    left = {k: [0, 0] for k in LEFT_OUT_KINDS}
    total = embeddings = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        total += n
        kind = kind_of(name, shape)
        embeddings += n if kind == "embeddings" else 0
        if not measured.get(name):
            left[kind][0] += 1
            left[kind][1] += n
    return Coverage(total, sum(measured.values()), embeddings, {k: (t, n) for k, (t, n) in left.items()})
