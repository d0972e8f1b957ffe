"""One weights file read a tensor, or a band of a tensor, at a time: safetensors by positioned reads at the
offsets its checked header gives (geometry.offline.header), torch pickles memory-mapped with ``weights_only=True``
(only where the caller opted in: geometry.offline.locate)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from geometry.buffers import Scratch
from geometry.errors import GeometryError, one_line
from geometry.offline.header import read_header

# safetensors dtype codes -> torch dtype names (getattr: older torch builds lack the newest ones).
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
    "C64": "complex64",
}
class SafetensorsFile:
    """One .safetensors file; shapes and dtypes come from its header, data is read per tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = read_header(path)  # bounded: a hostile header is refused before the library maps the file
        try:  # and the library must agree
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as e:  # SafetensorError
            raise GeometryError(f"{path}: not a readable safetensors file ({one_line(e)})") from None

    def dtype(self, name: str) -> torch.dtype:
        code = self.meta[name][1]
        dtype = getattr(torch, _ST_DTYPES.get(code, ""), None)
        if not isinstance(dtype, torch.dtype):
            raise GeometryError(f"{self.path}: tensor {name} has dtype {code}, which this torch cannot hold")
        return dtype

    def read(self, name: str, rows: slice | None, cols: slice | None = None, into: Scratch | None = None
             ) -> torch.Tensor:
        """The tensor, or a range of its rows (and of a matrix's columns), read by positioned reads into its own
        buffer (or ``into``'s, valid until its next use) at the offset the checked header gives: one read for
        whole rows, scattering reads for a range of columns (``_read_columns``). Nothing mapped, so no file page
        stays resident after it, and a file cut short since it was opened is a short read and one line, not a
        fault (a mapping would take SIGBUS)."""
        shape, _, start = self.meta[name]
        dtype = self.dtype(name)
        first, count = 0, (shape[0] if shape else 1)
        if rows is not None:
            first, stop, step = rows.indices(shape[0])
            if step != 1:  # not a fused split's contiguous range: the library slices it
                with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                    return handle.get_slice(name)[rows]
            count = max(0, stop - first)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        col0, width = 0, row_bytes
        if cols is not None:  # a band of a matrix's columns (offline.stored): contiguous slices only
            c0, c1, _ = cols.indices(shape[1])
            col0, width = c0 * dtype.itemsize, max(0, c1 - c0) * dtype.itemsize
        buf = torch.empty(count * width, dtype=torch.uint8) if into is None else into.bytes(count * width)
        view = memoryview(buf.numpy())
        try:
            with open(self.path, "rb") as f:
                if width == row_bytes:
                    got = _read_at(f.fileno(), view, start + first * row_bytes)
                else:
                    got = _read_columns(f.fileno(), view, start + first * row_bytes + col0, count, width, row_bytes)
        except OSError as e:
            raise GeometryError(f"{self.path}: cannot read tensor {name} ({e.strerror or e})") from None
        if got != len(view):
            raise GeometryError(f"{self.path}: truncated: tensor {name} ends past the end of the file")
        return buf.view(dtype).reshape((count, width // dtype.itemsize) if cols is not None else
                                       (count, *shape[1:]) if shape else ())


ROWS_A_READ = 256  # rows of a band of columns read by one scattering read (``_read_columns``); 2 buffers a row


def _read_columns(fd: int, view: memoryview, offset: int, count: int, width: int, row_bytes: int) -> int:
    """``count`` runs of ``width`` bytes, ``row_bytes`` apart from ``offset`` (a band of a matrix's columns),
    packed into ``view``; the bytes read into it. Rows are read ``ROWS_A_READ`` at a time by one scattering read,
    the bytes between two runs into a buffer thrown away: a read a row costs more than its bytes. A short read
    (the file cut short) is read again a row at a time, which counts what the file holds."""
    gap = memoryview(bytearray(row_bytes - width))
    got = 0
    for i0 in range(0, count, ROWS_A_READ):
        i1 = min(count, i0 + ROWS_A_READ)
        parts = [view[i * width:(i + 1) * width] for i in range(i0, i1)]
        buffers = [b for part in parts[:-1] for b in (part, gap)] + parts[-1:]
        want = (i1 - i0) * width + (i1 - i0 - 1) * len(gap)
        if os.preadv(fd, buffers, offset + i0 * row_bytes) == want:
            got += (i1 - i0) * width
            continue
        return got + sum(_read_at(fd, view[i * width:(i + 1) * width], offset + i * row_bytes)
                         for i in range(i0, count))
    return got


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """Bytes read into ``view`` from ``offset``, fewer only where the file ends. One read returns at most
    ~2 GiB on Linux: a larger tensor takes several."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class PickleFile:
    """One torch.save state dict, memory-mapped so only the tensors actually read touch memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise GeometryError(f"{path}: not a readable torch checkpoint ({one_line(e)})") from None
        if not isinstance(obj, dict):
            raise GeometryError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.meta = {k: (tuple(v.shape), str(v.dtype)) for k, v in self._tensors.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, rows: slice | None) -> torch.Tensor:
        t = self._tensors[name]
        return t if rows is None else t[rows]
