"""Tiny models as raw safetensors bytes, so tests can write headers the safetensors library never would."""

import json

import torch
from safetensors.torch import save

UP, DOWN = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"


def tiny(seed: int, scale: float = 0.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    """Two float32 matrices; with `base`, base + scale * noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {UP: (12, 8), DOWN: (8, 12)}
    if base is None:
        return {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    return {n: w + scale * torch.randn(w.shape, generator=g) for n, w in base.items()}


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data part) of a well-formed file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | bytes, body: bytes) -> bytes:
    """A file from a header (a dict, or raw JSON bytes written as given) and a data part."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body
