"""Checkpoint readers: open a model or a training run lazily and pick the matrices to measure.

A model is never loaded whole. Each safetensors file is opened once (its header is checked at open time by
geometry.offline.header, so a truncated, corrupt or hostile file fails early with its path) and every read
pulls one tensor, or only the rows of one part of a fused tensor. Where a model lives, which files hold it,
its name and its step come from geometry.offline.locate. Pickle checkpoints (``*.bin``) can run code when
loaded, so they are refused unless the caller opts in, and are then read with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from geometry import experts
from geometry.buffers import Scratch
from geometry.capture.layout import is_store
from geometry.errors import GeometryError, one_line
from geometry.offline.config import ON_MISMATCH
from geometry.offline.header import read_header
from geometry.offline.locate import (
    CHECKPOINT,
    PICKLE_REFUSED,
    PICKLE_SUFFIXES,
    ignored_pickles,
    label_of,
    locate,
    read_json,
    step_of,
    weight_files,
)
from geometry.selection import (
    Coverage,
    as_patterns,
    choose,
    coverage,
    layer_of,
    matches,
    module_of,
    natural_order,
)

# safetensors dtype codes -> torch dtype names (getattr: older torch builds lack the newest ones).
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
    "C64": "complex64",
}
# What the metrics can use: bf16 equality and SVDs of real floating-point weights. Integer, bool and
# float8/float4 weights (quantized checkpoints) are refused for a selected matrix rather than misread.
MEASURABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _SafetensorsFile:
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


class _PickleFile:
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


class TensorSource:
    """Lazy, read-only view of one model's tensors (possibly spread over several shard files)."""

    def __init__(self, label: str, files: dict[str, _SafetensorsFile | _PickleFile], config: dict | None,
                 notes: Sequence[str] = ()):
        self.label = label  # the path it was opened from (the hub name for a hub model)
        self.config = config  # parsed config.json next to the weights; fused-matrix splitting needs it
        self._files = files  # tensor name -> the file holding it
        self.notes = list(notes)  # choices made while opening it, for the analysis notes
        # stacked expert tensors [E, a, b] are seen as their experts' (out, in) matrices (geometry.experts)
        stacked, expert_notes = experts.split({n: f.meta[n][0] for n, f in files.items()},
                                              model_type=(config or {}).get("model_type"))
        self._parts = {p.name: p for parts in stacked.values() for p in parts}
        self.stacked = set(stacked)  # the stacked tensors, hidden behind their experts' matrices
        self.notes += [f"{label}: {n}" for n in expert_notes]

    def __repr__(self) -> str:
        return f"TensorSource({self.label!r}, {len(self._files)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._parts or (name in self._files and name not in self.stacked)

    def files(self) -> frozenset[Path]:
        """The files its tensors are read from, resolved: two sources with the same files are the same model
        (runs naming one base share its decomposition, geometry.offline.analyze)."""
        return frozenset(f.path.resolve() for f in self._files.values())

    def names(self) -> list[str]:
        """Tensor names in natural order, so layer 10 comes after layer 9; a stacked expert tensor's experts in
        its place."""
        return natural_order([n for n in self._files if n not in self.stacked] + list(self._parts))

    def _file(self, name: str) -> _SafetensorsFile | _PickleFile:
        if name not in self._files:
            raise GeometryError(f"checkpoint {self.label}: no tensor named {name}")
        return self._files[name]

    def in_safetensors(self, name: str) -> bool:
        """Whether the tensor is in a safetensors file (read in parts without loading it: offline.stored); an
        expert of a stacked tensor is read whole (one expert's slab)."""
        return name not in self._parts and isinstance(self._file(name), _SafetensorsFile)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._parts:
            return self._parts[name].shape
        return self._file(name).meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        stored = self._parts[name].tensor if name in self._parts else name
        return self._file(stored).dtype(stored)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None, into: Scratch | None = None
             ) -> torch.Tensor:
        """Read one tensor (or only its `rows`; of a matrix in a safetensors file, also only its `cols`, and
        into a reused buffer: offline.stored) as stored: its own dtype, on the CPU."""
        if name in self._parts:
            return self._read_expert(self._parts[name], rows, cols)
        f = self._file(name)
        try:
            return f.read(name, rows) if cols is None and into is None else f.read(name, rows, cols, into)
        except Exception as e:
            raise GeometryError(f"checkpoint {self.label}: cannot read {name} ({one_line(e)})") from None

    def coverage(self, specs: Iterable[MatrixSpec]) -> Coverage:
        """The share of this model's parameters the selected matrices hold, what they leave out by kind."""
        measured: dict[str, int] = {}
        for spec in specs:
            stored = self._parts[spec.tensor].tensor if spec.tensor in self._parts else spec.tensor
            measured[stored] = measured.get(stored, 0) + math.prod(spec.shape)
        return coverage({n: f.meta[n][0] for n, f in self._files.items()}, measured)

    def _read_expert(self, part: experts.ExpertPart, rows: slice | None, cols: slice | None) -> torch.Tensor:
        """One expert's (out, in) matrix: its slab [1, a, b] of the stacked tensor read alone, then its part."""
        f = self._file(part.tensor)
        try:
            slab = f.read(part.tensor, slice(part.expert, part.expert + 1))  # (1, a, b)
        except Exception as e:
            raise GeometryError(f"checkpoint {self.label}: cannot read {part.name} ({one_line(e)})") from None
        m = part.of(slab)  # (out, in)
        return m[rows if rows is not None else slice(None), cols if cols is not None else slice(None)].contiguous()


def _build(label: str, found: list[tuple[Path, list[str] | None]]) -> dict:
    files: dict[str, _SafetensorsFile | _PickleFile] = {}
    for p, names in found:
        f = _SafetensorsFile(p) if p.suffix == ".safetensors" else _PickleFile(p)
        for n in list(f.meta) if names is None else names:
            if n not in f.meta:
                raise GeometryError(f"{label}: the index puts tensor {n} in {p.name}, which lacks it")
            if n in files:
                raise GeometryError(f"{label}: tensor {n} is in both {files[n].path.name} and {p.name}")
            files[n] = f
    return files


def open_source(path: str | Path, *, allow_pickle: bool = False) -> TensorSource:
    """Open an HF model dir (single or sharded safetensors), a bare .safetensors file, a hub name in the
    local cache, or, with `allow_pickle`, a pytorch_model.bin / *.bin. Only headers are read here."""
    p, hub = locate(path)
    return _open(p, hub, allow_pickle)


def _open(p: Path, hub: str | None, allow_pickle: bool) -> TensorSource:
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise GeometryError(f"{p}: {PICKLE_REFUSED}")
        if p.suffix != ".safetensors" and p.suffix not in PICKLE_SUFFIXES:
            raise GeometryError(f"{p}: not a weights file (expected .safetensors or, opted in, .bin)")
        found: list[tuple[Path, list[str] | None]] | None = [(p, None)]
    elif p.is_dir():
        found = weight_files(p, allow_pickle)
        framework = _framework(p, allow_pickle) if found is None else None
        if framework:
            return framework.source
    else:
        raise GeometryError(f"{p}: neither a file nor a folder")
    if found is None:
        raise GeometryError(f"{p}: no model weights (model.safetensors, *.safetensors or pytorch_model.bin)")
    label = hub or str(p)
    files = _build(label, found)
    if not files:
        raise GeometryError(f"{p}: the weights hold no tensors")
    config = read_json((p if p.is_dir() else p.parent) / "config.json")
    return TensorSource(label, files, config, ignored_pickles(p, found))


class Checkpoint(NamedTuple):
    step: int | None  # optimizer step: a checkpoint-N name or trainer_state.json; None where the files do not say
    source: TensorSource
    label: str  # name in the outputs: the folder or file name, or the hub name (geometry.offline.locate.label_of)


def _framework(d: Path, allow_pickle: bool) -> Checkpoint | None:
    """A folder holding no weights of its own as an RL framework's checkpoint: verl's FSDP shards
    (geometry.offline.verl) or a DeepSpeed ZeRO checkpoint (geometry.offline.zero); None when it is neither."""
    from geometry.offline import verl, zero

    return verl.open_step(d, allow_pickle) or zero.open_step(d, allow_pickle)


def _framework_steps(run: Path) -> list[tuple[int, Path]]:
    """verl's ``global_step_N`` or DeepSpeed's ``global_stepN`` subfolders, in step order."""
    from geometry.offline import verl, zero

    return verl.step_dirs(run) or zero.step_dirs(run)


def _checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` subfolders sorted by N. Hidden and `.tmp` folders are a writer's unfinished
    output (it writes `.tmp-checkpoint-N`, then renames), so they never count."""
    found = {}
    for d in run.iterdir():
        m = CHECKPOINT.fullmatch(d.name)
        if d.is_dir() and m:
            step = int(m.group(1))
            if step in found:
                raise GeometryError(f"{run}: two checkpoints for step {step}: {found[step].name}, {d.name}")
            found[step] = d
    return sorted(found.items())


def open_base(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """The base model of a run, as step 0 with its label."""
    p, hub = locate(path)
    return Checkpoint(0, _open(p, hub, allow_pickle), label_of(p, hub))


def open_run(path: str | Path, *, allow_pickle: bool = False, base: TensorSource | None = None) -> list[Checkpoint]:
    """A Trainer/TRL output dir -> its checkpoints in step order; a plain model dir, file or hub name -> one,
    whose step is None unless its name is checkpoint-N or a trainer_state.json says it. A PEFT LoRA adapter
    folder is read against ``base`` as W0 + scale B A (geometry.offline.adapters)."""
    from geometry.offline.adapters import AdapterSource, is_adapter

    def one(d: Path, hub: str | None):
        if is_adapter(d) and weight_files(d, allow_pickle) in (None, [(d / "adapter_model.safetensors", None)]):
            if base is None:
                raise GeometryError(f"{d}: a LoRA adapter, readable only against its base model")
            return AdapterSource(d, base)
        return _open(d, hub, allow_pickle)

    p, hub = locate(path)
    if p.is_dir():
        if is_store(p):  # a recorder's store: refused whole if its manifest was edited
            from geometry.capture.store import check_store  # here only: plain checkpoints need no capture code

            check_store(p)
        steps = _checkpoint_dirs(p) or (_framework_steps(p) if weight_files(p, allow_pickle) is None else [])
        if steps:
            return [Checkpoint(n, one(d, None), d.name) for n, d in steps]
        if is_adapter(p):
            return [Checkpoint(step_of(p), one(p, hub), label_of(p, hub))]
        if weight_files(p, allow_pickle) is None:
            framework = _framework(p, allow_pickle)
            if framework is None:
                raise GeometryError(f"{p}: no checkpoint-N folders and no model weights")
            return [framework if step_of(p) is None else framework._replace(step=step_of(p))]
    return [Checkpoint(step_of(p), _open(p, hub, allow_pickle), label_of(p, hub))]


class MatrixSpec(NamedTuple):
    name: str  # output name: the parameter name, or "<fused name>[q]"-style for a split part
    tensor: str  # the stored tensor to read
    rows: slice | None  # rows of the stored tensor for a split fused part; None = all
    layer: int | None  # block index parsed from the name; None for embeddings / lm_head
    module: str  # q_proj, gate_proj, down_proj, embed_tokens, lm_head, ...
    shape: tuple[int, int]  # shape of the (split) matrix


class Selection(NamedTuple):
    matrices: list[MatrixSpec]
    skipped: list[tuple[str, str]]  # (name, reason); only filled when on_mismatch="skip"


def _fused_parts(module: str, rows: int, config: dict | None) -> list[tuple[str, str, int]] | None:
    """(suffix, module, n_rows) of each part of a contiguously fused matrix, or None to keep it whole.

    Only layouts whose parts are contiguous row blocks are split (Phi-3 qkv_proj, gate_up_proj: gate
    first), and only when config.json's sizes add up to the stored rows exactly. GPT-NeoX/Bloom
    `query_key_value` interleaves q/k/v per head, which one row slice cannot express: kept whole.
    """
    cfg = (config or {}).get("text_config") or config
    if not isinstance(cfg, dict):
        return None

    def size(key: str) -> int | None:  # a hand-edited config.json may hold anything
        v = cfg.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    if module == "qkv_proj":
        heads, hidden = size("num_attention_heads"), size("hidden_size")
        kv = size("num_key_value_heads") or heads
        head_dim = size("head_dim") or (hidden // heads if hidden and heads else None)
        if not (heads and kv and head_dim):
            return None
        q, k = heads * head_dim, kv * head_dim
        parts = [("q", "q_proj", q), ("k", "k_proj", k), ("v", "v_proj", k)]
    elif module == "gate_up_proj" and size("intermediate_size"):
        parts = [("gate", "gate_proj", size("intermediate_size")), ("up", "up_proj", size("intermediate_size"))]
    else:
        return None
    return parts if sum(n for _, _, n in parts) == rows else None


def _specs(name: str, shape: tuple[int, int], config: dict | None) -> list[MatrixSpec]:
    module, layer = module_of(name), layer_of(name)
    parts = _fused_parts(module, shape[0], config)
    if parts is None:
        return [MatrixSpec(name, name, None, layer, module, shape)]
    specs, start = [], 0
    for suffix, part_module, n in parts:
        specs.append(MatrixSpec(f"{name}[{suffix}]", name, slice(start, start + n), layer, part_module,
                                (n, shape[1])))
        start += n
    return specs


def _mismatch(name: str, base: TensorSource, checkpoints: list[TensorSource]) -> str | None:
    """Why a selected matrix cannot be measured (missing, another shape, a dtype the metrics cannot use)."""
    shape = base.shape(name)
    for c in checkpoints:
        if name not in c:
            return f"checkpoint {c.label}: tensor {name} is missing (base {base.label} has shape {shape})"
        if c.shape(name) != shape:
            return f"checkpoint {c.label}: tensor {name} has shape {c.shape(name)}, base has {shape}"
    for c in (base, *checkpoints):
        if c.dtype(name) not in MEASURABLE:
            return (f"{c.label}: tensor {name} is {str(c.dtype(name)).removeprefix('torch.')}; only float16, "
                    "bfloat16, float32 and float64 weights can be measured (dequantize, or --exclude it)")
    return None


def select_matrices(base: TensorSource, checkpoints: list[TensorSource], *, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), embeddings: bool = False, on_mismatch: str = "error") -> Selection:
    """The matrices to measure (geometry.selection), checked against every checkpoint; fused matrices are
    split as `_fused_parts` says. on_mismatch (AnalysisConfig's): "error" raises, "skip" lists."""
    if on_mismatch not in ON_MISMATCH:
        raise GeometryError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    shapes = {name: base.shape(name) for name in base.names()}
    chosen = choose(shapes, include=include, exclude=exclude, embeddings=embeddings)
    if not chosen:
        named = [n for n in shapes if matches(n, include) and not matches(n, exclude)]
        if as_patterns(include, "include") and named:
            raise GeometryError(f"tensor {named[0]} is not a matrix (shape {shapes[named[0]]})")
        raise GeometryError(f"{base.label}: no matrix selected (include={list(include)}, exclude={list(exclude)})")
    matrices, skipped = [], []
    for name in chosen:
        problem = _mismatch(name, base, checkpoints)
        if problem and on_mismatch == "error":
            raise GeometryError(problem)
        if problem:
            skipped.append((name, problem))
        else:
            matrices.extend(_specs(name, base.shape(name), base.config))
    if not matrices:
        raise GeometryError(f"{base.label}: every selected matrix was skipped, first: {skipped[0][1]}")
    return Selection(matrices, skipped)


COMPARE_BYTES = 16 << 20  # a band of rows read from each source at a time by ``same_tensors``


def same_tensors(a: TensorSource, b: TensorSource, names: Iterable[str]) -> bool:
    """Whether two sources hold the tensors ``names`` with the same dtype, shape and bytes: read from the same
    files, or compared a band of rows at a time until the first difference (two copies of one base, as each
    run's recorder stores it, hold the same bytes under other names and headers)."""
    if a.files() == b.files():
        return True
    names = list(dict.fromkeys(names))
    if any(n not in a or n not in b or a.dtype(n) != b.dtype(n) or a.shape(n) != b.shape(n) for n in names):
        return False
    for n in names:
        rows = a.shape(n)[0]
        step = max(1, COMPARE_BYTES // max(1, math.prod(a.shape(n)[1:]) * a.dtype(n).itemsize))
        for i in range(0, rows, step):
            x, y = (s.read(n, slice(i, min(rows, i + step))).reshape(-1).view(torch.uint8) for s in (a, b))
            if not torch.equal(x, y):
                return False
    return True


def read_matrix(source: TensorSource, spec: MatrixSpec) -> torch.Tensor:
    """One selected matrix as stored (dtype, CPU), rows sliced for a fused part; NaN/Inf refused
    because every metric downstream would silently turn into NaN."""
    t = source.read(spec.tensor, spec.rows)  # (rows, cols)
    check_shape(source, spec, tuple(t.shape))
    return check_finite(source, spec, t)


def check_shape(source: TensorSource, spec: MatrixSpec, shape: tuple[int, ...]) -> None:
    """A matrix read (or about to be) with the shape its selection expects, else one line."""
    if tuple(shape) != tuple(spec.shape):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has shape {tuple(shape)}, "
                            f"expected {spec.shape}")


def check_finite(source: TensorSource, spec: MatrixSpec, t: torch.Tensor) -> torch.Tensor:
    """t (a matrix or a band of it) if it has no NaN/Inf, else one line. The sum first (one pass, no mask, in the
    stored dtype: 30x faster than a float64 one): finite for almost every matrix; only a non-finite sum (NaN/Inf,
    or an overflow of finite values) pays for the elementwise check."""
    if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has NaN/Inf values")
    return t
