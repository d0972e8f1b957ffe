"""Which matrices are measured (SPEC "Which matrices"), and how a parameter name reads.

One rule for offline analysis (names and shapes from a checkpoint's header) and for training-time
capture (a live model, where the Linear layers are known): every 2-D weight of a Linear layer;
embeddings and lm_head only when asked; ``include`` / ``exclude`` regexes (re.search) on the name.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

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
