"""Tracking files: every tracked matrix's Estimate at a step, encoded and read back.

``tracking/<N>.safetensors`` holds step N. Version 2 (and 3) stacks the matrices of one shape into group g:
    "<g>:stats" (B, 4) float64 rows (fro, iters, residual, exact),   "<g>:s" (B, K) float32,
    "<g>:u" (B, m, K), "<g>:v" (B, n, K) in the tracking dtype (float16 by default),
with the metadata "groups" a JSON list of each group's matrix names. Version 1 kept the same four
tensors per matrix, "<name>:stats", "<name>:s", ...; it is still read.

``tracking/chunk-<first>-<last>.safetensors`` (store version 3) holds the steps of one chunk: each step N's
tensors under "<N>/<g>:<part>", its groups in the metadata "<N>/groups", the steps in "steps". A store
writes a step's own file first and merges the files into a chunk later (geometry.capture.store).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from geometry.capture.tracking import Estimate
from geometry.errors import GeometryError, one_line

PARTS = ("stats", "s", "u", "v")


def tracking_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "tracking" / f"{step}.safetensors"


def chunk_path(run_dir: str | Path, chunk: tuple[int, int]) -> Path:
    return Path(run_dir) / "tracking" / f"chunk-{chunk[0]}-{chunk[1]}.safetensors"


def encode(records: Mapping[str, Estimate], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Estimates (top K columns) -> (tensors, metadata) of a tracking file, u and v cast to ``dtype``.

    A few tensors per shape rather than four per matrix: writing a file costs Python time per tensor, and
    the writer thread holds the GIL for it (benchmarks/bench_store.py).
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


def merge(files: Mapping[int, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Step files (step -> path, version 2) -> the (tensors, metadata) of one chunk file holding them all."""
    steps = {}
    for step, path in files.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            steps[step] = ({key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {})  # noqa: SIM118
    return join(steps)


def join(steps: Mapping[int, tuple[dict[str, torch.Tensor], Mapping[str, str]]]) -> tuple[dict, dict[str, str]]:
    """Encoded steps (step -> ``encode``'s (tensors, metadata)) -> one chunk file's (tensors, metadata)."""
    tensors, metadata = {}, {"steps": json.dumps(sorted(steps))}
    for step, (ts, md) in sorted(steps.items()):
        metadata[f"{step}/groups"] = md["groups"]
        tensors.update({f"{step}/{key}": t for key, t in ts.items()})
    return tensors, metadata


def read_tracking(run_dir: str | Path, step: int, chunk: tuple[int, int] | None = None) -> dict[str, Estimate]:
    """Every tracked matrix's Estimate at a tracking step; GeometryError (one line) if its file is missing or
    unreadable. chunk: the chunk file holding the step (Manifest.chunk_of); None: its own file, or, where that
    is gone (merged into a chunk meanwhile), the chunk the store's manifest names."""
    if chunk is None:
        try:
            return _read(tracking_path(run_dir, step), [step], chunked=False)[step]
        except FileNotFoundError:
            from geometry.capture.manifest import read_manifest  # the manifest module imports none of this one

            chunk = read_manifest(run_dir).chunk_of(step)
            if chunk is None:
                raise GeometryError(f"{tracking_path(run_dir, step)}: no tracking file for step {step}") from None
    return read_chunk(run_dir, chunk, [step])[step]


def read_chunk(run_dir: str | Path, chunk: tuple[int, int], steps: list[int]) -> dict[int, dict[str, Estimate]]:
    """The Estimates of the given steps of one chunk file, read with one open."""
    try:
        return _read(chunk_path(run_dir, chunk), steps, chunked=True)
    except FileNotFoundError:
        raise GeometryError(f"{chunk_path(run_dir, chunk)}: missing (tracking of steps {chunk[0]}..{chunk[1]})") \
            from None


def _read(path: Path, steps: list[int], chunked: bool) -> dict[int, dict[str, Estimate]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata, out, keys = f.metadata() or {}, {}, {}
            for key in f.keys():  # noqa: SIM118 - a safetensors handle
                step, _, part = key.partition("/") if chunked else ("", "", key)
                keys.setdefault(step, []).append((key, part))
            for step in steps:
                prefix = f"{step}/" if chunked else ""
                if chunked and f"{prefix}groups" not in metadata:
                    raise GeometryError(f"{path}: holds no tracking of step {step}")
                tensors = {part: f.get_tensor(key) for key, part in keys.get(str(step) if chunked else "", [])}
                groups = metadata.get(f"{prefix}groups")
                out[step] = decode(tensors, {"groups": groups} if groups is not None else {})
            return out
    except (FileNotFoundError, GeometryError):
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, a bad "groups" list, a missing tensor: one cause
        raise GeometryError(f"{path}: unreadable tracking file ({one_line(e)})") from None
