"""verl FSDP checkpoints read as the model they hold, one tensor at a time.

verl's FSDP checkpoint manager writes, at each save, ``global_step_N/actor/model_world_size_W_rank_R.pt`` (rank
R's ``model.state_dict()``: DTensors, each holding that rank's shard) and ``actor/huggingface/`` (config.json,
tokenizer). A ``global_step_N`` folder (or its ``actor/``) is step N; a folder of them is a run.

The shards are pickles: refused unless the caller opts in, then loaded with ``weights_only=True`` allowing only
the DTensor classes, and memory-mapped, so opening reads metadata and a tensor's bytes are paged in only when it
is read. A read gathers one tensor: its shards concatenated as its placements say (``Shard(d)``: along d in mesh
order; ``Replicate``: one copy), so at most one full tensor is in memory at a time. Plain tensors (not DTensors)
are concatenated along dim 0 in rank order, as verl's own model merger does.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.buffers import Scratch
from geometry.errors import GeometryError, one_line
from geometry.offline.locate import PICKLE_REFUSED, read_json
from geometry.offline.sources import Checkpoint, TensorSource

STEP = re.compile(r"global_step_(\d+)")  # verl's folder of one save
SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")


def _has_shards(d: Path) -> bool:
    return d.is_dir() and any(SHARD.fullmatch(f.name) for f in d.iterdir())


def step_dirs(run: Path) -> list[tuple[int, Path]]:
    """The ``global_step_N`` subfolders of a verl run, in step order."""
    found = [(int(m.group(1)), d) for d in run.iterdir() if d.is_dir() and (m := STEP.fullmatch(d.name))]
    return sorted(found)


def open_step(d: Path, allow_pickle: bool) -> Checkpoint | None:
    """``d`` as one verl checkpoint (a ``global_step_N`` folder, or the ``actor/`` folder holding the shards),
    step N; None when it holds no verl shards and is not named like one."""
    actor = next((a for a in (d, d / "actor") if _has_shards(a)), None)
    if actor is None:
        if STEP.fullmatch(d.name):
            raise GeometryError(f"{d}: a verl checkpoint folder without actor shards "
                                "(actor/model_world_size_W_rank_R.pt)")
        return None
    if not allow_pickle:
        raise GeometryError(f"{actor}: verl's FSDP shards are pickles; {PICKLE_REFUSED}")
    shards = VerlShards(actor)
    config = read_json(actor / "huggingface" / "config.json") or read_json(actor / "config.json")
    m = STEP.fullmatch(actor.name) or STEP.fullmatch(actor.parent.name)
    return Checkpoint(int(m.group(1)) if m else None, TensorSource(str(actor), dict.fromkeys(shards.meta, shards),
                                                                   config), m.group(0) if m else actor.name)


def _dtensor_classes() -> list:
    """What a DTensor state dict pickles (torch >= 2.5 names; a class this torch lacks is left out)."""
    try:
        import torch.distributed.tensor as dt
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import _dtensor_spec as spec
        from torch.distributed.tensor import placement_types as pt
    except ImportError:
        raise GeometryError(f"reading verl's DTensor shards needs torch >= 2.5 (this is {torch.__version__})") from None

    classes = [dt.DTensor, DeviceMesh, pt.Shard, pt.Replicate, pt.Partial, spec.DTensorSpec, spec.TensorMeta]
    classes += [c for c in (getattr(pt, "_StridedShard", None), getattr(spec, "ShardOrderEntry", None)) if c]
    with contextlib.suppress(ImportError):  # torch >= 2.9 pickles a mesh's layout
        from torch.distributed import _mesh_layout as layout

        classes += [layout._MeshLayout, getattr(layout, "_FlatLayout", None)]
    return [c for c in classes if c is not None]


@contextlib.contextmanager
def _quiet_mesh():
    """A DeviceMesh unpickled outside its job warns that its process groups are gone: expected here."""
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _load(path: Path) -> dict[str, torch.Tensor]:
    """One rank's state dict, memory-mapped, DTensor classes the only globals allowed."""
    if not torch.distributed.is_available():
        raise GeometryError(f"{path}: verl's DTensor shards need torch.distributed, which this torch build lacks")
    # only the classes not allowed already: leaving the context removes what it added, and torch itself allows
    # DTensor's classes for the whole process once torch.distributed.tensor is imported
    classes = _dtensor_classes()  # imports torch.distributed.tensor first
    allowed = torch.serialization.get_safe_globals()
    try:
        with _quiet_mesh(), torch.serialization.safe_globals([c for c in classes if c not in allowed]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise GeometryError(f"{path}: not a readable verl shard ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise GeometryError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class _Layout(NamedTuple):
    """How one tensor is spread over the rank files."""

    shape: tuple[int, ...]  # the full tensor's
    dtype: torch.dtype
    placements: tuple  # per mesh dimension: ("shard", d) or ("replicate",)
    mesh: tuple[int, ...]  # the device mesh's shape; (W,) for plain tensors
    ranks: dict[tuple[int, ...], int]  # mesh coordinate -> index of a rank file holding that shard


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _layout(where: Path, name: str, parts: list[torch.Tensor], world: int) -> _Layout:
    """The layout of tensor ``name`` from its W rank parts, checked: one kind, one shape, dtype and placement,
    every coordinate of the mesh held by some rank."""
    if not any(_is_dtensor(t) for t in parts):
        if len({(tuple(t.shape[1:]), t.dtype) for t in parts}) != 1 or parts[0].dim() == 0:
            raise GeometryError(f"{where}: plain tensor {name} has shapes or dtypes that differ across ranks, or "
                                "no dimension to concatenate")
        rows = sum(t.shape[0] for t in parts)
        return _Layout((rows, *parts[0].shape[1:]), parts[0].dtype, (("shard", 0),), (world,),
                       {(r,): r for r in range(world)})
    if not all(_is_dtensor(t) for t in parts):
        raise GeometryError(f"{where}: tensor {name} is a DTensor in some rank files and not in others")
    first = parts[0]
    placements = []
    for p in first.placements:
        kind = type(p).__name__
        if kind == "Shard":
            placements.append(("shard", p.dim))
        elif kind == "Replicate":
            placements.append(("replicate",))
        else:  # Partial (a pending sum) or _StridedShard (FSDP with tensor parallelism)
            raise GeometryError(f"{where}: tensor {name} has placement {p}; only Shard and Replicate are read")
    mesh = tuple(first.device_mesh.shape)
    ranks: dict[tuple[int, ...], int] = {}
    for r, t in enumerate(parts):
        if (tuple(t.shape), t.dtype, tuple(t.placements), tuple(t.device_mesh.shape)) != (
                tuple(first.shape), first.dtype, tuple(first.placements), mesh):
            raise GeometryError(f"{where}: tensor {name} has another shape, dtype or placement in rank {r}'s shard "
                                "than in rank 0's")
        coord = t.device_mesh.get_coordinate()
        if coord is not None:
            ranks.setdefault(tuple(coord), r)
    size = 1
    for n in mesh:
        size *= n
    if size != world or len(ranks) != size:
        raise GeometryError(f"{where}: tensor {name} is sharded over a mesh of {size} ranks {mesh}, but the files "
                            f"are a world of {world} holding {len(ranks)} distinct shards")
    return _Layout(tuple(first.shape), first.dtype, tuple(placements), mesh, ranks)


class VerlShards:
    """The rank files of one verl save, read as one file of full tensors (what geometry.offline.sources'
    TensorSource holds: ``path``, ``meta``, ``dtype``, ``read``): each file loaded (mapped) once, each read one
    tensor gathered from its shards."""

    def __init__(self, actor: Path):
        self.path = actor
        self._paths = _rank_files(actor)
        self._ranks = [_load(p) for p in self._paths]
        names = self._ranks[0].keys()
        for r, sd in enumerate(self._ranks[1:], start=1):
            if sd.keys() != names:
                lacks = sorted(names - sd.keys())
                holder, other, name = ((self._paths[r], 0, lacks[0]) if lacks else
                                       (self._paths[0], r, sorted(sd.keys() - names)[0]))
                raise GeometryError(f"{holder}: lacks tensor {name}, which rank {other}'s shard holds")
        self._layouts = {n: _layout(actor, n, [sd[n] for sd in self._ranks], len(self._ranks)) for n in names}
        self.meta = {n: (lay.shape, str(lay.dtype)) for n, lay in self._layouts.items()}

    def __repr__(self) -> str:
        return f"VerlShards({str(self.path)!r}, {len(self.meta)} tensors, world size {len(self._ranks)})"

    def dtype(self, name: str) -> torch.dtype:
        return self._layouts[name].dtype

    def read(self, name: str, rows: slice | None, cols: slice | None = None, into: Scratch | None = None
             ) -> torch.Tensor:
        """One tensor (or its ``rows``, ``cols``) gathered from the rank files, in its stored dtype; a range of
        rows of a tensor sharded by rows reads only the shards that hold them."""
        lay = self._layouts[name]
        if rows is not None and lay.placements == (("shard", 0),) and rows.step in (None, 1):
            t = self._rows(name, lay, rows)
        else:
            t = self._gather(name, lay, ())
            t = t if rows is None else t[rows]
        return t if cols is None else t[:, cols]

    def _local(self, name: str, lay: _Layout, coord: tuple[int, ...]) -> torch.Tensor:
        t = self._ranks[lay.ranks[coord]][name]
        return (t.to_local() if _is_dtensor(t) else t).detach()  # a saved Parameter may require grad

    def _gather(self, name: str, lay: _Layout, coord: tuple[int, ...]) -> torch.Tensor:
        """The part of the tensor under mesh coordinate prefix ``coord``: DTensor splits mesh dimension 0 first,
        so the shards are joined from the last mesh dimension back to the first."""
        i = len(coord)
        if i == len(lay.mesh):
            return self._local(name, lay, coord)
        if lay.placements[i][0] == "replicate":
            return self._gather(name, lay, (*coord, 0))
        full = torch.cat([self._gather(name, lay, (*coord, j)) for j in range(lay.mesh[i])], dim=lay.placements[i][1])
        if i == 0 and tuple(full.shape) != lay.shape:
            raise ValueError(f"its shards make shape {tuple(full.shape)}, not {lay.shape}")
        return full

    def _rows(self, name: str, lay: _Layout, rows: slice) -> torch.Tensor:
        """Rows of a tensor sharded by rows over a 1-D mesh: only the overlapping shards, sliced."""
        first, stop, _ = rows.indices(lay.shape[0])
        parts, at = [], 0
        for j in range(lay.mesh[0]):
            local = self._local(name, lay, (j,))
            if tuple(local.shape[1:]) != lay.shape[1:]:
                raise ValueError(f"rank {lay.ranks[(j,)]}'s shard has shape {tuple(local.shape)}")
            a, b = max(first, at), min(stop, at + local.shape[0])
            if a < b:
                parts.append(local[a - at:b - at])
            at += local.shape[0]
        if at != lay.shape[0]:
            raise ValueError(f"its shards hold {at} rows, not {lay.shape[0]}")
        if not parts:
            return torch.empty((0, *lay.shape[1:]), dtype=lay.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rank_files(actor: Path) -> list[Path]:
    """The model shards of one save, rank 0 to W-1; one line when a rank is missing or two saves are mixed."""
    by_world: dict[int, dict[int, Path]] = {}
    for f in actor.iterdir():
        m = SHARD.fullmatch(f.name)
        if m:
            by_world.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if len(by_world) > 1:
        raise GeometryError(f"{actor}: model shards of world sizes {sorted(by_world)} side by side; one save's only")
    (world, files), = by_world.items()
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise GeometryError(f"{actor}: world size {world}, but model_world_size_{world}_rank_{missing[0]}.pt is "
                            f"missing ({world - len(missing)} of {world} rank files)")
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise GeometryError(f"{actor}: {files[extra[0]].name} names rank {extra[0]} in a world of size {world}")
    return [files[r] for r in range(world)]
