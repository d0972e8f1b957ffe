"""Checkpoint readers: open a model or a training run lazily, as a TensorSource of its tensors.

A model is never loaded whole. Each safetensors file is opened once (its header is checked at open time by
geometry.offline.header, so a truncated, corrupt or hostile file fails early with its path) and every read
pulls one tensor, or only the rows of one part of a fused tensor (geometry.offline.files). Which of its
matrices are measured: geometry.offline.matrices. Where a model lives, which files hold it,
its name and its step come from geometry.offline.locate. Pickle checkpoints (``*.bin``) can run code when
loaded, so they are refused unless the caller opts in, and are then read with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from geometry import experts
from geometry.buffers import Scratch
from geometry.capture.layout import is_store
from geometry.errors import GeometryError, one_line
from geometry.offline.files import PickleFile, SafetensorsFile
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
from geometry.selection import Coverage, coverage, natural_order

if TYPE_CHECKING:
    from geometry.offline.matrices import MatrixSpec


class TensorSource:
    """Lazy, read-only view of one model's tensors (possibly spread over several shard files)."""

    def __init__(self, label: str, files: dict[str, SafetensorsFile | PickleFile], config: dict | None,
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

    def _file(self, name: str) -> SafetensorsFile | PickleFile:
        if name not in self._files:
            raise GeometryError(f"checkpoint {self.label}: no tensor named {name}")
        return self._files[name]

    def in_safetensors(self, name: str) -> bool:
        """Whether the tensor is in a safetensors file (read in parts without loading it: offline.stored); an
        expert of a stacked tensor is read whole (one expert's slab)."""
        return name not in self._parts and isinstance(self._file(name), SafetensorsFile)

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
    files: dict[str, SafetensorsFile | PickleFile] = {}
    for p, names in found:
        f = SafetensorsFile(p) if p.suffix == ".safetensors" else PickleFile(p)
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
