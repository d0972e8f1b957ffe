"""A matrix left in its safetensors file and read a band of its long side at a time, never held whole.

Every pass the quick suite makes over a matrix goes a band of rows of its long side at a time
(``linalg.long_blocks``, offline.blocked): handed a ``StoredMatrix`` instead of the tensor, each pass reads
its bands from the file again (from the page cache: a 12288 x 4096 float32 matrix is 200 MB not held),
and gets the same bands, bit for bit, as from the tensor read whole (tested). A wide matrix's long side is
its columns: a few bands of them are read together, a positioned read a row.
"""

from __future__ import annotations

import torch

from geometry.errors import GeometryError
from geometry.linalg import Scratch
from geometry.offline.sources import MatrixSpec, TensorSource

NARROW = (torch.float32, torch.bfloat16, torch.float16)  # float64 is used whole by the kernels (geometry.linalg)
WIDE_BANDS = 4  # a wide matrix's bands read together (``StoredMatrix._columns``)


class StoredMatrix:
    """One selected matrix (1, m, n) of ``source``: ``shape``, ``dtype`` and ``device`` as the tensor read whole
    would have, and ``long_band`` in place of its bands. NaN/Inf and a shape other than the selection's are
    refused with the line ``sources.read_matrix`` gives, the shape at once, the values band by band."""

    device = torch.device("cpu")

    def __init__(self, source: TensorSource, spec: MatrixSpec):
        self.source, self.spec = source, spec
        self.dtype = source.dtype(spec.tensor)
        rows, cols = source.shape(spec.tensor)  # 2-D (``fits``)
        first, stop, _ = (spec.rows or slice(None)).indices(rows)
        shape = (stop - first, cols)
        if shape != tuple(spec.shape):
            raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has shape {shape}, "
                                f"expected {spec.shape}")
        self.first = first
        self.shape = torch.Size((1, *shape))
        self._buf = Scratch()  # the bytes read, reused: a new buffer a band would be mapped afresh each time
        self._chunk: tuple[int, int, torch.Tensor] | None = None  # a wide matrix's columns read: (first, stop, m x w)

    @staticmethod
    def fits(source: TensorSource, spec: MatrixSpec) -> bool:
        """Whether the matrix can be read in bands: a 2-D tensor of a safetensors file, stored narrower than
        float64, a contiguous range of its rows."""
        return (isinstance(source, TensorSource) and spec.tensor in source and source.in_safetensors(spec.tensor)
                and len(source.shape(spec.tensor)) == 2 and source.dtype(spec.tensor) in NARROW
                and (spec.rows is None or spec.rows.step in (None, 1)))

    def long_band(self, part: slice) -> torch.Tensor:
        """(1, b, r): rows ``part`` of the long side (``linalg.long_rows``) as stored, valid until the next band
        is read; a wide matrix's columns as the transposed view of the (m, b) read."""
        m, n = self.shape[-2:]
        if m >= n:
            band = self.source.read(self.spec.tensor, slice(self.first + part.start, self.first + part.stop),
                                    into=self._buf)
        else:
            band = self._columns(part).mT
        if not bool(torch.isfinite(band.sum())) and not bool(torch.isfinite(band).all()):
            raise GeometryError(f"checkpoint {self.source.label}: tensor {self.spec.name} has NaN/Inf values")
        return band[None]

    def _columns(self, part: slice) -> torch.Tensor:
        """(m, b) columns ``part`` of a wide matrix, read ``WIDE_BANDS`` bands' width at a time: a read a row
        of a short run of columns costs more than its bytes (measured, a 4096 x 12288 float32 matrix's
        columns 256 at a time 0.26 s a pass, 1024 at a time 0.10 s, its rows whole 0.03 s)."""
        if self._chunk is None or not (self._chunk[0] <= part.start and part.stop <= self._chunk[1]):
            stop = min(self.shape[-1], part.start + WIDE_BANDS * (part.stop - part.start))
            m = self.shape[-2]
            read = self.source.read(self.spec.tensor, slice(self.first, self.first + m), slice(part.start, stop),
                                    self._buf)
            self._chunk = part.start, stop, read
        first, _, read = self._chunk
        return read[:, part.start - first:part.stop - first]
