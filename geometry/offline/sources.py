"""Checkpoint readers: open a model or a training run lazily and pick the matrices to measure.

A model is never loaded whole. Each safetensors file is opened once (its header is parsed at open time,
so a truncated or corrupt file fails early with its path) and every read pulls one tensor, or only the
rows of one part of a fused tensor. Pickle checkpoints (``*.bin``) can run code when loaded, so they are
refused unless the caller opts in, and are then read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from geometry.errors import GeometryError
from geometry.selection import as_patterns, choose, layer_of, matches, module_of, natural_order

# safetensors header dtype codes -> torch dtypes; unknown codes fall back to reading the tensor.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PICKLE_REFUSED = ("pickle checkpoints are refused (unpickling can run code); convert to safetensors "
                   "or opt in with --allow-pickle (allow_pickle=True)")
_CHECKPOINT_DIR = re.compile(r"checkpoint[-_](\d+)")
_TRAILING_STEP = re.compile(r"(?:[-_]|step[-_ ]?)(\d+)$", re.IGNORECASE)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class _SafetensorsFile:
    """One .safetensors file; shapes and dtypes come from its header, data is read per tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                slices = {k: handle.get_slice(k) for k in handle.keys()}
                self.meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
        except Exception as e:  # SafetensorError: truncated, garbage, header/size mismatch
            raise GeometryError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None

    def dtype(self, name: str) -> torch.dtype:
        code = self.meta[name][1]
        return _ST_DTYPES[code] if code in _ST_DTYPES else self.read(name, slice(0, 0)).dtype

    def read(self, name: str, rows: slice | None) -> torch.Tensor:
        # Opened per read: a file kept mapped would keep every page it ever served resident, and memory
        # would grow with the number of checkpoints an analysis visits.
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]


class _PickleFile:
    """One torch.save state dict, memory-mapped so only the tensors actually read touch memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise GeometryError(f"{path}: not a readable torch checkpoint ({_one_line(e)})") from None
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

    def __init__(self, label: str, files: dict[str, _SafetensorsFile | _PickleFile], config: dict | None):
        self.label = label  # the path it was opened from
        self.config = config  # parsed config.json next to the weights; fused-matrix splitting needs it
        self._files = files  # tensor name -> the file holding it

    def __repr__(self) -> str:
        return f"TensorSource({self.label!r}, {len(self._files)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        """Tensor names in natural order, so layer 10 comes after layer 9."""
        return natural_order(self._files)

    def _file(self, name: str) -> _SafetensorsFile | _PickleFile:
        if name not in self._files:
            raise GeometryError(f"checkpoint {self.label}: no tensor named {name}")
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor (or only its `rows`) as stored: its own dtype, on the CPU."""
        f = self._file(name)
        try:
            return f.read(name, rows)
        except Exception as e:
            raise GeometryError(f"checkpoint {self.label}: cannot read {name} ({_one_line(e)})") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GeometryError(f"{path}: not valid JSON ({_one_line(e)})") from None


def _weight_files(d: Path, allow_pickle: bool) -> list[tuple[Path, list[str] | None]] | None:
    """The weight files of a model dir, each with the tensor names its index assigns it (None: all
    it holds); None when the dir holds no weights. safetensors wins, so a dir with both is never unpickled.
    """
    for kind, single in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        index = d / f"{single}.index.json"
        # training_args.bin is a pickled TrainingArguments that Trainer leaves in every checkpoint.
        files = sorted(f for f in d.glob(f"*.{kind}") if f.is_file() and f.name != "training_args.bin")
        if not (index.is_file() or files):
            continue
        if kind == "bin" and not allow_pickle:
            raise GeometryError(f"{d}: only pickle weights (*.bin) found; {_PICKLE_REFUSED}")
        if not index.is_file():
            return [(d / single, None)] if (d / single).is_file() else [(f, None) for f in files]
        weight_map = (_read_json(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GeometryError(f"{index}: no weight_map")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in sorted(shards):
            if not (d / shard).is_file():
                raise GeometryError(f"{index}: names shard {shard}, which does not exist in {d}")
        return [(d / shard, names) for shard, names in sorted(shards.items())]
    return None


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
    """Open an HF model dir (single or sharded safetensors), a bare .safetensors file, or, with
    `allow_pickle`, a pytorch_model.bin / *.bin. Only headers are read here."""
    p = Path(path)
    if not p.exists():
        raise GeometryError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in _PICKLE_SUFFIXES and not allow_pickle:
            raise GeometryError(f"{p}: {_PICKLE_REFUSED}")
        if p.suffix != ".safetensors" and p.suffix not in _PICKLE_SUFFIXES:
            raise GeometryError(f"{p}: not a weights file (expected .safetensors or, opted in, .bin)")
        found: list[tuple[Path, list[str] | None]] | None = [(p, None)]
    else:
        found = _weight_files(p, allow_pickle)
    if found is None:
        raise GeometryError(f"{p}: no model weights (model.safetensors, *.safetensors or pytorch_model.bin)")
    files = _build(str(p), found)
    if not files:
        raise GeometryError(f"{p}: the weights hold no tensors")
    config = _read_json((p if p.is_dir() else p.parent) / "config.json")
    return TensorSource(str(p), files, config)


class Checkpoint(NamedTuple):
    step: int  # optimizer step the weights were saved at
    source: TensorSource


def _checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` subfolders sorted by N. Hidden and `.tmp` folders are a writer's unfinished
    output (it writes `.tmp-checkpoint-N`, then renames), so they never count."""
    found = {}
    for d in run.iterdir():
        m = _CHECKPOINT_DIR.fullmatch(d.name)
        if d.is_dir() and m and not d.name.startswith(".") and ".tmp" not in d.name:
            step = int(m.group(1))
            if step in found:
                raise GeometryError(f"{run}: two checkpoints for step {step}: {found[step].name}, {d.name}")
            found[step] = d
    return sorted(found.items())


def _step_of(p: Path) -> int:
    """Step of a single model: a trailing -N/_N/stepN in its name (or its folder's), else
    trainer_state.json's global_step, else 0."""
    d = p if p.is_dir() else p.parent
    for name in (p.stem if p.is_file() else p.name, d.name if p.is_file() else ""):
        m = _TRAILING_STEP.search(name)
        if m:
            return int(m.group(1))
    state = _read_json(d / "trainer_state.json") or {}
    return int(state.get("global_step") or 0)


def open_run(path: str | Path, *, allow_pickle: bool = False) -> list[Checkpoint]:
    """A Trainer/TRL output dir -> its checkpoints in step order; a plain model dir or file -> one."""
    p = Path(path)
    if p.is_dir():
        steps = _checkpoint_dirs(p)
        if steps:
            return [Checkpoint(n, open_source(d, allow_pickle=allow_pickle)) for n, d in steps]
        if _weight_files(p, allow_pickle) is None:
            raise GeometryError(f"{p}: no checkpoint-N folders and no model weights")
    return [Checkpoint(_step_of(p), open_source(p, allow_pickle=allow_pickle))]


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
    if module == "qkv_proj":
        heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
        if not (heads and kv and head_dim):
            return None
        q, k = heads * head_dim, kv * head_dim
        parts = [("q", "q_proj", q), ("k", "k_proj", k), ("v", "v_proj", k)]
    elif module == "gate_up_proj" and cfg.get("intermediate_size"):
        parts = [("gate", "gate_proj", cfg["intermediate_size"]), ("up", "up_proj", cfg["intermediate_size"])]
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
    shape = base.shape(name)
    for c in checkpoints:
        if name not in c:
            return f"checkpoint {c.label}: tensor {name} is missing (base {base.label} has shape {shape})"
        if c.shape(name) != shape:
            return f"checkpoint {c.label}: tensor {name} has shape {c.shape(name)}, base has {shape}"
    return None


def select_matrices(base: TensorSource, checkpoints: list[TensorSource], *, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), embeddings: bool = False, on_mismatch: str = "error") -> Selection:
    """The matrices to measure (geometry.selection), checked against every checkpoint; fused matrices are
    split as `_fused_parts` says."""
    if on_mismatch not in ("error", "skip"):
        raise GeometryError(f"on_mismatch must be 'error' or 'skip', got {on_mismatch!r}")
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


def read_matrix(source: TensorSource, spec: MatrixSpec) -> torch.Tensor:
    """One selected matrix as stored (dtype, CPU), rows sliced for a fused part; NaN/Inf refused
    because every metric downstream would silently turn into NaN."""
    t = source.read(spec.tensor, spec.rows)  # (rows, cols)
    if tuple(t.shape) != tuple(spec.shape):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has shape {tuple(t.shape)}, "
                            f"expected {spec.shape}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has NaN/Inf values")
    return t
