"""Which plan the kernels take for a tensor: the CPU plan or the GPU plan.

The CPU plan goes a matrix at a time through numpy's BLAS and LAPACK (geometry.kernels, geometry.symeig), in
reused buffers, with masks packed to bits and thresholds selected a band at a time; the GPU plan gives each step
to one batched torch kernel over the whole (L, m, n) tensor, and lets the certified subspace iteration replace
an eigensolver's vectors where it is cheaper (``symeig.top_eigvecs``). A tensor on an accelerator takes the GPU
plan. Within ``gpu_plan()`` tensors on the CPU take it too, in float64 as everywhere: every GPU branch then runs
on a machine without a GPU, and the suite checks it against the CPU plan on the same data (tests/test_cuda.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_forced = False  # process-wide, not per thread: the offline analysis measures groups on several threads


def gpu(x: torch.Tensor | torch.device) -> bool:
    """Whether work on x (a tensor, or the device it is on) takes the GPU plan: x lives off the CPU, or the
    call is within ``gpu_plan``."""
    device = x if isinstance(x, torch.device) else x.device
    return _forced or device.type != "cpu"


@contextmanager
def gpu_plan() -> Iterator[None]:
    """Within it, work on CPU tensors takes the GPU plan too: torch's batched kernels on whole tensors, as on a
    CUDA device. For tests and debugging: it is slower than the CPU plan on the CPU, and holds a group's
    float64 update whole.

    >>> import torch
    >>> from geometry import plan
    >>> with plan.gpu_plan():
    ...     plan.gpu(torch.zeros(2))
    True
    >>> plan.gpu(torch.zeros(2))
    False
    """
    global _forced
    before, _forced = _forced, True
    try:
        yield
    finally:
        _forced = before
