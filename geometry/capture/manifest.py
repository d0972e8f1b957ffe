"""A store's manifest, ``geometry-store.json``: one typed record, parsed, checked and written here only.

    {"format": "geometry-store", "version": 3,
     "base": {"label": str, "sha256": hex},           the tracked tensors at step 0 (base/)
     "tensors": [{"name", "shape", "dtype"}, ...],      in name order
     "settings": {...},                                 the recorder's settings (a resumed run must repeat them)
     "steps": [int, ...],                               complete snapshots (checkpoint-N/), ascending
     "tracking_steps": [int | [first, last, stride], ...]  steps with tracking state, ascending; version 3
                                                        writes runs of 3+ evenly spaced steps as one triple
     "tracking_chunks": [[first, last], ...],           version 3: chunk files, ascending, disjoint
     "final_step": int | null}                          set by a clean close

A tracking step lies in tracking/chunk-<first>-<last>.safetensors when a listed chunk's range holds it,
else in its own file tracking/<N>.safetensors (geometry.capture.trackfile). Versions 1 and 2 have no
chunks (one file per step); a resumed one keeps its version and its layout.

A manifest edited by hand (a field missing or of another type, steps out of order or repeated) is
refused with one GeometryError line naming the field, before anything else of the store is read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.errors import GeometryError

FORMAT, VERSION = "geometry-store", 3
# version 1 kept one set of tensors per matrix in a tracking file; its manifest is version 2's. Version 3 adds
# chunk files holding many steps each: a long run's folder lists hundreds of files, not one per step.
READS = (1, 2, 3)
MANIFEST = "geometry-store.json"


class TensorInfo(NamedTuple):
    """One tracked tensor as the manifest lists it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without "torch.": bfloat16, float32, ...


@dataclass
class Manifest:
    """A store's manifest (module docstring). Mutable: a Store keeps one in memory, adds steps as their files
    land, and writes it back with ``to_json``."""

    base_label: str
    base_sha256: str  # base_hash of the tensors in base/
    tensors: list[TensorInfo]  # in name order
    settings: dict  # JSON values: tuples become lists
    steps: list[int] = field(default_factory=list)  # complete snapshots, ascending
    tracking_steps: list[int] = field(default_factory=list)  # steps with tracking state, ascending
    final_step: int | None = None  # last step of a cleanly closed run; None while running or after a crash
    version: int = VERSION  # kept as read: a resumed version-1 store stays version 1 (readers check each file)
    tracking_chunks: list[tuple[int, int]] = field(default_factory=list)  # (first, last) of each chunk file
    # tracking_steps as arithmetic runs, extended as steps are appended (_encoded_tracking)
    _runs: tuple | None = field(default=None, compare=False, repr=False)

    def chunk_of(self, step: int) -> tuple[int, int] | None:
        """The listed chunk whose range holds step, or None (the step has a file of its own)."""
        i = bisect.bisect_right(self.tracking_chunks, (step, math.inf)) - 1
        return self.tracking_chunks[i] if i >= 0 and self.tracking_chunks[i][1] >= step else None

    def loose_steps(self) -> list[int]:
        """Tracking steps in files of their own (those after the last chunk: chunks are made in step order)."""
        last = self.tracking_chunks[-1][1] if self.tracking_chunks else -1
        return self.tracking_steps[bisect.bisect_right(self.tracking_steps, last):]

    def last_complete(self) -> int | None:
        """The last step whose every write landed: with tracking on, every recorded step has tracking,
        written after the step's snapshot; without it, snapshots are all there is."""
        every = self.settings.get("track_every")
        if every is None:  # a store written without a recorder's settings: any landed step counts
            done = self.steps + self.tracking_steps
        else:
            done = self.tracking_steps if every > 0 else self.steps
        return max(done) if done else None

    def add_snapshot(self, step: int) -> None:
        _insert(self.steps, step)

    def add_tracking(self, step: int) -> None:
        _insert(self.tracking_steps, step)

    def add_chunk(self, chunk: tuple[int, int]) -> None:
        if self.version < 3 or (self.tracking_chunks and chunk[0] <= self.tracking_chunks[-1][1]):
            raise ValueError(f"chunk {chunk} cannot follow {self.tracking_chunks[-1:]} (store version {self.version})")
        self.tracking_chunks.append(tuple(chunk))

    def to_json(self, indent: int | None = None) -> bytes:
        """The file's bytes. No indent for the frequent rewrites: json's C encoder only runs without one, and
        the writer thread holds the GIL while it encodes."""
        d = {"format": FORMAT, "version": self.version,
             "base": {"label": self.base_label, "sha256": self.base_sha256},
             "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors],
             "settings": self.settings, "steps": self.steps,
             "tracking_steps": self._encoded_tracking() if self.version >= 3 else self.tracking_steps,
             "final_step": self.final_step}
        if self.version >= 3:
            d["tracking_chunks"] = [list(c) for c in self.tracking_chunks]
        return json.dumps(d, indent=indent).encode()

    def _encoded_tracking(self) -> list:
        """tracking_steps with runs of evenly spaced steps as [first, last, stride]: a long run's manifest, rewritten
        every commit_seconds, stays a few numbers long. The runs are extended by the steps appended since the last
        call (O(new steps)); recomputed if the list was replaced or changed before its end."""
        steps, cache = self.tracking_steps, self._runs
        if cache is None or cache[0] is not steps or cache[1] > len(steps) or (cache[1] and steps[cache[1] - 1]
                                                                                != cache[2]):
            cache = (steps, 0, None, [])
        runs = cache[3]
        for step in steps[cache[1]:]:
            _extend(runs, step)
        self._runs = (steps, len(steps), steps[-1] if steps else None, runs)
        out: list = []
        for a, b, d in runs:
            count = (b - a) // d + 1 if d else 1
            if count <= 2:
                out.extend((a, b) if count == 2 else (a,))
            else:
                out.append([a, b, d])
        return out

    @classmethod
    def from_json(cls, text: str | bytes, where: str | Path = MANIFEST) -> Manifest:
        """Parse and check a manifest; GeometryError (one line, naming ``where``) if it is not a valid one."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GeometryError(f"{where}: unreadable manifest ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") not in READS:
            raise GeometryError(f"{where}: not a {FORMAT} manifest of version {', '.join(map(str, READS))}")
        try:
            return _parse(d)
        except _Bad as e:
            raise GeometryError(f"{where}: invalid manifest: {e}") from None


def _extend(runs: list[list[int]], step: int) -> None:
    """Append a step (above the last) to arithmetic runs [first, last, stride] (stride 0: a single step)."""
    if runs:
        a, b, d = runs[-1]
        if d == 0 or step - b == d:
            runs[-1] = [a, step, step - b]
            return
    runs.append([step, step, 0])


def _insert(steps: list[int], step: int) -> None:
    if not steps or step > steps[-1]:
        steps.append(step)  # the usual case: O(1), not O(steps)
    elif step not in steps:
        steps.insert(next(i for i, s in enumerate(steps) if s > step), step)


class _Bad(Exception):
    """What is wrong with a manifest, said in a few words."""


def _get(d: Mapping, key: str, kind: type | tuple[type, ...], what: str = "") -> object:
    if key not in d:
        raise _Bad(f"{what or key} is missing")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"{what or key} is {type(value).__name__} {json.dumps(value)[:40]}, not {name}")
    return value


def _is_step(s: object) -> bool:
    return isinstance(s, int) and not isinstance(s, bool) and s >= 0


def _step_list(d: Mapping, key: str, runs: bool = False) -> list[int]:
    """An ascending list of steps; runs: entries may also be [first, last, stride] (version 3's tracking_steps)."""
    steps: list[int] = []
    for s in _get(d, key, list):
        if runs and isinstance(s, list):
            if not (len(s) == 3 and all(map(_is_step, s)) and s[0] < s[1] and s[2] > 0 and (s[1] - s[0]) % s[2] == 0):
                raise _Bad(f"{key} holds {json.dumps(s)[:40]}, not a run [first, last, stride]")
            first, part = s[0], range(s[0], s[1] + 1, s[2])
        elif _is_step(s):
            first, part = s, (s,)
        else:
            raise _Bad(f"{key} holds {json.dumps(s)[:40]}, not a step (an integer >= 0)")
        if steps and first <= steps[-1]:
            a = steps[-1]
            raise _Bad(f"{key} are not in ascending order ({a} then {first})" if first < a else
                       f"{key} lists step {a} twice")
        steps.extend(part)
    return steps


def _tensor(t: object, i: int) -> TensorInfo:
    if not isinstance(t, dict):
        raise _Bad(f"tensors[{i}] is not an object")
    name = _get(t, "name", str, f"tensors[{i}].name")
    shape = _get(t, "shape", list, f"tensors[{i}].shape")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise _Bad(f"tensors[{i}].shape is {json.dumps(shape)[:40]}, not a list of sizes")
    return TensorInfo(name, tuple(shape), _get(t, "dtype", str, f"tensors[{i}].dtype"))


def _parse(d: dict) -> Manifest:
    base = _get(d, "base", dict)
    sha = _get(base, "sha256", str, "base.sha256")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _Bad(f"base.sha256 is {sha[:40]!r}, not a sha256 hex digest")
    tensors = [_tensor(t, i) for i, t in enumerate(_get(d, "tensors", list))]
    names = [t.name for t in tensors]
    if names != sorted(set(names)):
        raise _Bad("tensors are not in name order, or a name is repeated")
    final = d.get("final_step")  # absent in stores that never closed before it existed
    if final is not None and (not isinstance(final, int) or isinstance(final, bool) or final < 0):
        raise _Bad(f"final_step is {json.dumps(final)[:40]}, not a step or null")
    return Manifest(_get(base, "label", str, "base.label"), sha, tensors, _get(d, "settings", dict),
                    _step_list(d, "steps"), _step_list(d, "tracking_steps", d["version"] >= 3), final, d["version"],
                    _chunks(d) if d["version"] >= 3 else [])


def _chunks(d: dict) -> list[tuple[int, int]]:
    chunks, last = [], -1
    for i, c in enumerate(_get(d, "tracking_chunks", list)):
        if (not isinstance(c, list) or len(c) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in c)):
            raise _Bad(f"tracking_chunks[{i}] is {json.dumps(c)[:40]}, not [first, last]")
        if not last < c[0] <= c[1]:
            raise _Bad(f"tracking_chunks[{i}] {c} is empty, overlaps or is out of order")
        chunks.append((c[0], c[1]))
        last = c[1]
    return chunks


def read_manifest(run_dir: str | Path) -> Manifest:
    """A store's manifest, checked (module docstring); GeometryError if there is none or it is invalid."""
    path = Path(run_dir) / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise GeometryError(f"{run_dir}: not a geometry store (no {MANIFEST})") from None
    except OSError as e:
        raise GeometryError(f"{path}: unreadable manifest ({e.strerror or e})") from None
    return Manifest.from_json(text, path)


def base_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' raw bytes, in name order (dtype-exact: bf16 and fp32 bases differ)."""
    return fingerprint(tensors)[0]


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> tuple[str, list[TensorInfo]]:
    """``base_hash`` and what the manifest lists of the tensors (name, shape, dtype; name order), in one pass:
    from a mapping that reads its tensors from disk when asked (layout.LazySnapshot), one is in memory at a
    time."""
    h, infos = hashlib.sha256(), []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        infos.append(TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return h.hexdigest(), infos
