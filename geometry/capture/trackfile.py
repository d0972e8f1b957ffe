"""A tracking file, ``tracking/<N>.safetensors``: every tracked matrix's Estimate at step N, encoded and read back.

Version 2 (written now) stacks the matrices of one shape into group g:
    "<g>:stats" (B, 4) float64 rows (fro, iters, residual, exact),   "<g>:s" (B, K) float32,
    "<g>:u" (B, m, K), "<g>:v" (B, n, K) in the tracking dtype (float16 by default),
with the metadata "groups" a JSON list of each group's matrix names. Version 1 kept the same four
tensors per matrix, "<name>:stats", "<name>:s", ...; it is still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from geometry.capture.tracking import Estimate
from geometry.errors import GeometryError

PARTS = ("stats", "s", "u", "v")


def tracking_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "tracking" / f"{step}.safetensors"


def encode(records: Mapping[str, Estimate], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Estimates (top K columns) -> (tensors, metadata) of a tracking file, u and v cast to ``dtype``.

    A few tensors per shape rather than four per matrix: writing a file costs Python time per tensor, and
    the writer thread holds the GIL for it (measured: 2-3 ms a step for 28 matrices, now ~0.3 ms).
    """
    by_shape: dict[tuple, list[str]] = {}
    for name, t in records.items():
        by_shape.setdefault((tuple(t.s.shape), tuple(t.u.shape), tuple(t.v.shape)), []).append(name)
    tensors = {}
    for g, names in enumerate(by_shape.values()):
        recs = [records[n] for n in names]
        tensors[f"{g}:stats"] = torch.tensor([[t.fro, t.iters, t.residual, float(t.exact)] for t in recs],
                                             dtype=torch.float64)
        tensors[f"{g}:s"] = torch.stack([t.s.detach() for t in recs]).to("cpu", torch.float32)
        tensors[f"{g}:u"] = torch.stack([t.u.detach() for t in recs]).to("cpu", dtype)
        tensors[f"{g}:v"] = torch.stack([t.v.detach() for t in recs]).to("cpu", dtype)
    return tensors, {"groups": json.dumps(list(by_shape.values()))}


def decode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Estimate]:
    """A tracking file's (tensors, metadata), version 1 or 2 -> each matrix's Estimate; u, v upcast to float32."""
    groups = json.loads(metadata.get("groups", "null"))
    if groups is None:  # version 1: one group per matrix, its tensors named after it
        groups = [[key.removesuffix(":stats")] for key in tensors if key.endswith(":stats")]
        tensors = {f"{g}:{part}": tensors[f"{names[0]}:{part}"][None] for g, names in enumerate(groups)
                   for part in PARTS}
    out = {}
    for g, names in enumerate(groups):
        stats, s, u, v = (tensors[f"{g}:{part}"] for part in PARTS)
        for i, name in enumerate(names):
            fro, iters, res, exact = stats[i].tolist()
            out[name] = Estimate(u[i].float(), s[i].float(), v[i].float(), fro, int(iters), res, bool(exact))
    return out


def read_tracking(run_dir: str | Path, step: int) -> dict[str, Estimate]:
    """Every tracked matrix's Estimate at a tracking step; GeometryError (one line) if its file is missing or
    unreadable."""
    path = tracking_path(run_dir, step)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safetensors handle
        return decode(tensors, metadata)
    except FileNotFoundError:
        raise GeometryError(f"{path}: no tracking file for step {step}") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError, a bad "groups" list, a missing tensor: one cause
        raise GeometryError(f"{path}: unreadable tracking file ({' '.join(str(e).split())})") from None
