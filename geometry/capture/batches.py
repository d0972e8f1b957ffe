"""Same-shape updates D_t = W_t - W0 batched for the tracking iteration, in buffers reused from step to step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """Same-shape matrices' updates, valid until the next ``add`` of that shape."""

    names: list[str]
    d: torch.Tensor  # (B, m, n) float32 D_t = W_t - W0
    fro: torch.Tensor  # (B,) ||D_t||_F


class UpdateBatches:
    """Updates D_t = W_t - W0 (float32) of same-shape matrices, gathered into batches of at most ``mb`` MiB per
    shape (at least one matrix) for geometry.capture.tracking's batched iteration. One buffer per shape, kept from
    step to step (allocating them afresh costs page faults every step); memory: one batch per shape.

    Per step: ``start``, then ``add`` each matrix (a full batch comes back as soon as there is one), then ``rest``.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], mb: float):
        self.count: dict[tuple[int, int], int] = {}  # tracked matrices of each shape
        for shape in shapes.values():
            self.count[shape] = self.count.get(shape, 0) + 1
        self.size = {s: min(c, max(1, int(mb * 2**20 // (4 * math.prod(s))))) for s, c in self.count.items()}
        self.buf: dict[tuple[int, int], torch.Tensor] = {}
        self.fro: dict[tuple[int, int], torch.Tensor] = {}  # ||D_t||_F of each, taken while D_t is in cache
        self.start()

    def start(self) -> None:
        """Begin a step: no matrix added yet."""
        self.left = dict(self.count)  # matrices of each shape not yet in a batch this step
        self.names: dict[tuple[int, int], list[str]] = {}

    def add(self, name: str, w: torch.Tensor, w0: torch.Tensor) -> Batch | None:
        """Put W_t - W0 into its shape's batch; the batch (names, D (B, m, n), ||D||_F (B,)) when that makes it
        full. The batch is valid until the next ``add`` of that shape."""
        shape = tuple(w.shape)
        buf = self.buf.get(shape)
        if buf is None or buf.device != w.device:
            buf = self.buf[shape] = torch.empty((self.size[shape], *shape), dtype=torch.float32, device=w.device)
            self.fro[shape] = torch.empty(self.size[shape], dtype=torch.float32, device=w.device)
        names = self.names.setdefault(shape, [])
        i = len(names)
        torch.sub(w.float(), w0.float(), out=buf[i])  # float32 arithmetic, exact bf16 -> float32 upcasts
        torch.linalg.vector_norm(buf[i], out=self.fro[shape][i])
        names.append(name)
        if len(names) < min(buf.shape[0], self.left[shape]):
            return None
        self.left[shape] -= len(names)
        del self.names[shape]
        return self._batch(shape, names)

    def rest(self) -> Iterator[Batch]:
        """The batches not yet full (none, when every matrix was added)."""
        for shape in list(self.names):
            yield self._batch(shape, self.names.pop(shape))

    def _batch(self, shape: tuple[int, int], names: list[str]) -> Batch:
        return Batch(names, self.buf[shape][: len(names)], self.fro[shape][: len(names)])
