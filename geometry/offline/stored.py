"""A matrix left in its safetensors file and read a band of its long side at a time, never held whole.

Every pass the suites make over a matrix goes a band of rows at a time: of its long side (``kernels.long_blocks``,
offline.blocked), or of its rows (the low-magnitude mask). Handed a ``StoredMatrix`` instead of the tensor,
each pass reads its bands from the file again (from the page cache: a 12288 x 4096 float32 matrix is 200 MB
not held), and gets the same bands, bit for bit, as from the tensor read whole (tested). A wide matrix's long
side is its columns: a few bands of them are read together, a positioned read a row. What decomposes it
whole (an exact SVD, a fallback) reads it whole (``double``).
"""

from __future__ import annotations

import torch

from geometry.buffers import Scratch
from geometry.offline.matrices import MatrixSpec, check_finite, check_shape
from geometry.offline.sources import TensorSource

NARROW = (torch.float32, torch.bfloat16, torch.float16)  # float64 is used whole by the kernels (geometry.kernels)
WIDE_BANDS = 4  # a wide matrix's bands read together (``StoredMatrix._columns``)


class StoredMatrix:
    """One selected matrix (1, m, n) of ``source`` (``one()``: the same as (m, n)): ``shape``, ``dtype`` and
    ``device`` as the tensor read whole would have, ``long_band`` and ``rows`` in place of its bands, and
    ``double()`` for the paths that take it whole (an exact SVD). NaN/Inf and a shape other than the selection's
    are refused with the line ``matrices.read_matrix`` gives, the shape at once, the values band by band."""

    device = torch.device("cpu")

    def __init__(self, source: TensorSource, spec: MatrixSpec, batched: bool = True):
        self.source, self.spec, self.batched = source, spec, batched
        self.dtype = source.dtype(spec.tensor)
        rows, cols = source.shape(spec.tensor)  # 2-D (``fits``)
        first, stop, _ = (spec.rows or slice(None)).indices(rows)
        shape = (stop - first, cols)
        check_shape(source, spec, shape)
        self.first = first
        self.shape = torch.Size((1, *shape) if batched else shape)
        self._buf = Scratch()  # the bytes read, reused: a new buffer a band would be mapped afresh each time
        self._chunk: tuple[int, int, torch.Tensor] | None = None  # a wide matrix's columns read: (first, stop, m x w)

    @staticmethod
    def fits(source: TensorSource, spec: MatrixSpec) -> bool:
        """Whether the matrix can be read in bands: a 2-D tensor of a safetensors file, stored narrower than
        float64, a contiguous range of its rows."""
        return (isinstance(source, TensorSource) and spec.tensor in source and source.in_safetensors(spec.tensor)
                and len(source.shape(spec.tensor)) == 2 and source.dtype(spec.tensor) in NARROW
                and (spec.rows is None or spec.rows.step in (None, 1)))

    def one(self) -> StoredMatrix:
        """The matrix as (m, n), as a (1, m, n) tensor's [0] (its own buffer)."""
        return StoredMatrix(self.source, self.spec, batched=False)

    def long_band(self, part: slice) -> torch.Tensor:
        """(1, b, r): rows ``part`` of the long side (``kernels.long_rows``) as stored, valid until the next band
        is read; a wide matrix's columns as the transposed view of the (m, b) read."""
        m, n = self.shape[-2:]
        return self._checked(self._rows(part, self._buf) if m >= n else self._columns(part).mT)

    def rows(self, part: slice) -> torch.Tensor:
        """(1, b, n) ((b, n) for ``one()``): rows ``part`` of the matrix as stored, valid until the next read."""
        self._chunk = None  # its buffer is taken
        return self._checked(self._rows(part, self._buf))

    def double(self) -> torch.Tensor:
        """The matrix whole in float64 (for the paths that decompose it whole)."""
        return self._checked(self._rows(slice(0, self.shape[-2]), None)).double()

    def _rows(self, part: slice, into: Scratch | None) -> torch.Tensor:
        return self.source.read(self.spec.tensor, slice(self.first + part.start, self.first + part.stop),
                                into=into)

    def _checked(self, band: torch.Tensor) -> torch.Tensor:
        check_finite(self.source, self.spec, band)
        return band[None] if self.batched else band

    def _columns(self, part: slice) -> torch.Tensor:
        """(m, b) columns ``part`` of a wide matrix, read ``WIDE_BANDS`` bands' width at a time: a short run of
        columns costs more to read than its bytes (measured, a 4096 x 12288 float32 matrix's
        columns 256 at a time 0.26 s a pass, 1024 at a time 0.10 s, its rows whole 0.03 s)."""
        if self._chunk is None or not (self._chunk[0] <= part.start and part.stop <= self._chunk[1]):
            stop = min(self.shape[-1], part.start + WIDE_BANDS * (part.stop - part.start))
            m = self.shape[-2]
            read = self.source.read(self.spec.tensor, slice(self.first, self.first + m), slice(part.start, stop),
                                    self._buf)
            self._chunk = part.start, stop, read
        first, _, read = self._chunk
        return read[:, part.start - first:part.stop - first]
