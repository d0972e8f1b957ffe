"""A safetensors header, checked before the safetensors library sees the file.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data, offsets relative to its start. A hostile or broken file must end in one clear line, in
bounded memory and time, so the length is capped before anything is read, and the tensors must tile
the data exactly: in range, contiguous, non-overlapping, each span equal to shape x dtype size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from geometry.errors import GeometryError, one_line

# Real LLM headers are well under 1 MB per shard (a 100k-tensor file would need ~13 MB). The library allows
# 100 MB, but parsing that many tiny entries costs ~3 GB and half a minute (measured); 16 MiB, ~0.4 GB and
# a few seconds, bounds what a hostile header can cost.
MAX_HEADER_BYTES = 16 << 20

# Bits per element of every dtype code the format defines (F4/F6 pack several elements per byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return d


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, info: object) -> tuple[tuple[int, ...], str, int, int]:
    """(shape, dtype, begin, end) of one header entry, or ValueError saying what is wrong."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"tensor {name!r}: entry lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets is not [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise ValueError(f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                         f"but shape {shape} of {dtype} needs {bits / 8:g}")
    return tuple(shape), dtype, offsets[0], offsets[1]


def _check_tiling(spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' byte ranges must cover the data from 0 to its end without gaps or overlaps."""
    for _, end, name in spans:
        if end > data_bytes:
            raise ValueError(f"tensor {name!r} ends at byte {end}, past the {data_bytes} bytes of data")
    at, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            raise ValueError(f"tensor {name!r} overlaps tensor {prev!r} (bytes {begin}..{end})")
        if begin > at:
            raise ValueError(f"a gap of {begin - at} bytes before tensor {name!r}")
        at, prev = end, name
    if at != data_bytes:
        raise ValueError(f"the tensors end at byte {at} of the data, but the file holds {data_bytes}")


def parse(data_bytes: int, header: bytes) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, dtype code, first byte within the data part) from the JSON header of a file whose data
    part is data_bytes long; ValueError when the header is not one the format allows."""
    try:
        doc = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("header JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("header is not UTF-8") from None
    if not isinstance(doc, dict):
        raise ValueError("header is not a JSON object")
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a map of strings")
    tensors, spans = {}, []
    for name, info in doc.items():
        shape, dtype, begin, end = _entry(name, info)
        tensors[name] = (shape, dtype, begin)
        spans.append((begin, end, name))
    _check_tiling(spans, data_bytes)
    return tensors


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, dtype code, first byte in the file) of a safetensors file, checked; GeometryError naming
    the file otherwise. Reads at most the 8-byte length plus MAX_HEADER_BYTES."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the {size - 8} bytes after it")
            tensors = parse(size - 8 - n, f.read(n))
            return {k: (shape, dtype, 8 + n + begin) for k, (shape, dtype, begin) in tensors.items()}
    except OSError as e:
        raise GeometryError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise GeometryError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
