"""Offline analysis across torchrun ranks: the matrix groups split by cost, rank 0 gathers.

``torchrun --nproc-per-node N -m geometry analyze ...`` (one node or many, the same code) starts N copies;
each finds its rank in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), measures only the
groups assigned to it, reading only their tensors, on its own local GPU when there is one, and sends its
rows and curves to rank 0, which writes the outputs. Without torchrun (WORLD_SIZE unset or 1) nothing here
starts a process group: one process does every group, as before.

Collectives go over gloo (CPU objects: rows and curves), whichever device measures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from geometry.errors import GeometryError


class World(NamedTuple):
    """This process's place in the job: rank in [0, size), and its index among the ranks of its node."""

    rank: int
    size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The job as torchrun describes it in the environment; one process when it does not."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise GeometryError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer") from None
    if size < 1 or not 0 <= rank < size:
        raise GeometryError(f"RANK {rank} outside WORLD_SIZE {size}")
    if size > 1 and not torch.distributed.is_initialized():
        # MASTER_ADDR/PORT come from torchrun; gloo carries the Python objects rank 0 gathers
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    return World(rank, size, local)


def local_device(device: torch.device, w: World) -> torch.device:
    """A CUDA device without an index means this rank's local GPU (LOCAL_RANK), one GPU per rank."""
    if device.type == "cuda" and device.index is None and w.distributed:
        return torch.device("cuda", w.local_rank % max(1, torch.cuda.device_count()))
    return device


def group_cost(shape: tuple[int, int], count: int) -> float:
    """Relative work of one group: per matrix, Gram products (m n r) and eigendecompositions (r^3)."""
    m, n = shape
    r = min(m, n)
    return count * (m * n * r + 4 * r**3)


def assign(costs: Sequence[float], size: int) -> list[int]:
    """The rank of each group: longest job first to the least loaded rank (LPT; within 4/3 of the best
    split). The same on every rank: ties go to the lower group index and the lower rank."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += costs[g]
    return owner


def gather(w: World, payload: Any, error: str | None) -> list[Any] | None:
    """Every rank's status, then rank 0 gets every payload (the others None). A rank that failed makes
    every rank raise one GeometryError naming it, so that the job ends with one clear line and no outputs."""
    if not w.distributed:
        if error is not None:
            raise GeometryError(error)
        return [payload]
    errors: list[str | None] = [None] * w.size
    torch.distributed.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise GeometryError(f"rank {r} of {w.size} failed: {e}")
    out: list[Any] | None = [None] * w.size if w.rank == 0 else None
    torch.distributed.gather_object(payload, out, dst=0)
    return out


def close(w: World) -> None:
    if w.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
