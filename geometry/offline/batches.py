"""Matrices of one shape measured as one batch (L, m, n) within the memory budget, and read as the suites read
them: on the CPU plan a matrix of its own is left in its file (geometry.offline.stored)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import torch

from geometry.offline.engine import group_size
from geometry.offline.matrices import MatrixSpec, read_matrix
from geometry.offline.sources import TensorSource
from geometry.offline.stored import StoredMatrix
from geometry.plan import gpu as on_gpu_plan

# On the CPU every decomposition runs a matrix at a time (geometry.linalg), so a batch saves only the per-call
# overhead of small matrices, and costs memory: batches are kept to this many float64 bytes (a larger cap raises
# the peak at the same time: benchmarks/bench_analyze.py). A GPU batches its kernels: up to the budget and this
# many float64 bytes a batch.
CPU_BATCH_BYTES, GPU_BATCH_BYTES = 4 << 20, 32 << 20


def batch_groups(specs: list[MatrixSpec], memory_mb: float, device: torch.device | None = None,
            k_of: Callable[[tuple[int, int]], int] | None = None) -> list[list[MatrixSpec]]:
    """Same-shape matrices batched together (``batch_size``)."""
    out = []
    for shape, same in groupby(sorted(specs, key=lambda s: s.shape), key=lambda s: s.shape):
        same = list(same)
        size = batch_size(shape, memory_mb, device, k_of and k_of(shape))
        out += [same[i:i + size] for i in range(0, len(same), size)]
    return out


def batch_size(shape: tuple[int, int], memory_mb: float, device: torch.device | None = None,
               k: int | None = None) -> int:
    """How many (m, n) matrices are measured as one batch: within the memory budget, and their (L, m, n)
    float64 tensor under the cap (``CPU_BATCH_BYTES`` on the CPU plan, ``GPU_BATCH_BYTES`` on the GPU plan:
    geometry.plan)."""
    cap = GPU_BATCH_BYTES if device is not None and on_gpu_plan(device) else CPU_BATCH_BYTES
    return min(group_size(shape, memory_mb, k), max(1, cap // (8 * shape[0] * shape[1])))


def stored_group(source: TensorSource, group: list[MatrixSpec], device: torch.device):
    """The group as the suite reads it: on the CPU plan a matrix of its own is left in its file, read a band at a time
    by each pass (offline.stored): a lower peak for a little more time, the same table bit for bit (tested;
    benchmarks/bench_analyze.py); otherwise (L, m, n) read whole (``read_group``)."""
    if not on_gpu_plan(device) and len(group) == 1 and StoredMatrix.fits(source, group[0]):
        return StoredMatrix(source, group[0])
    return read_group(source, group, device)


def read_group(source: TensorSource, group: list[MatrixSpec], device: torch.device) -> torch.Tensor:
    """(L, m, n) in the stored dtype; one matrix is not copied into a stack."""
    if len(group) == 1:
        return read_matrix(source, group[0]).to(device)[None]
    return torch.stack([read_matrix(source, spec) for spec in group]).to(device)
