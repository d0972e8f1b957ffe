"""A run's geometry store: base, snapshots and per-step tracking, written atomically in the background.

Layout of a store directory RUN (``geometry analyze RUN/base RUN`` reads it as a Trainer run):

    geometry-store.json                manifest: format, version, base {label, sha256}, tracked
                                       tensors [{name, shape, dtype}], settings, "steps" (complete
                                       snapshots), "tracking_steps", "final_step" (set on a clean close)
    base/model.safetensors             the tracked tensors at step 0 (the store is self-contained)
    checkpoint-<N>/model.safetensors   the tracked tensors at step N, stored dtype (bf16 stays bf16)
    tracking/<N>.safetensors           per-step tracking state of every tracked matrix (``Tracked``),
                                       stacked by shape: tensors "<g>:stats" (B, 4), "<g>:s" (B, K),
                                       "<g>:u" (B, m, K), "<g>:v" (B, n, K) for group g, whose matrix
                                       names are the metadata "groups" (a JSON list of name lists)

Every file is written under a ``.tmp-`` name in its final folder, flushed and fsynced, renamed with
os.replace, and the folder fsynced; a snapshot folder is ``.tmp-checkpoint-N`` until renamed. The
manifest is rewritten the same way after each snapshot lands, so it is always valid JSON and lists
only complete data. Tracking files land one per step, and the manifest takes them in at most every
``COMMIT_SECONDS`` (rewriting it at every step costs time that grows with the run: it lists every
step), at a snapshot, and at ``flush`` and ``close``. Readers ignore ``.tmp*``; ``Store.open`` deletes
them and snapshots that landed without their manifest entry (a crash between the two), and takes in
the tracking files that landed after the manifest's last rewrite (each is whole: it was renamed into
place after an fsync), so that a crash loses no landed step.

The disk work runs on one background thread fed by a bounded queue: the training thread only
copies tensors to the CPU, and blocks when ``queue_size`` jobs are waiting (memory stays bounded).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geometry.atomic import fsync_path, save_atomic, write_atomic
from geometry.errors import GeometryError

FORMAT, VERSION = "geometry-store", 2
READS = (1, 2)  # version 1 kept one set of tensors per matrix in a tracking file
MANIFEST = "geometry-store.json"
CREATING = ".geometry-store-creating"  # present from the first byte of a new store until its manifest lands
_STEP_FILE = re.compile(r"(\d+)\.safetensors")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
COMMIT_SECONDS = 1.0  # the longest a landed tracking file waits for the manifest to list it (module docstring)


class Tracked(NamedTuple):
    """One matrix's tracking state at one step (geometry.capture.tracking), as stored and read back."""

    fro: float  # ||D_t||_F
    s: torch.Tensor  # (K,) top-K singular value estimates, float32
    u: torch.Tensor  # (m, K) top-K left singular subspace of D_t (stored float16 by default)
    v: torch.Tensor  # (n, K) top-K right singular subspace
    iters: int  # subspace iterations spent at this step
    residual: float  # relative Ritz residual after the last iteration
    exact: bool  # True when the iteration fell back to the exact SVD


class Manifest(NamedTuple):
    base_label: str
    base_sha256: str
    tensors: list[dict]  # [{name, shape, dtype}] in name order
    settings: dict
    steps: list[int]  # complete snapshots, ascending
    tracking_steps: list[int]  # steps with tracking state, ascending
    final_step: int | None  # last step of a cleanly closed run; None while running or after a crash


def base_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' raw bytes, in name order (dtype-exact: bf16 and fp32 bases differ)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ---- a model folder, atomically ----

def _save_folder(tensors: dict[str, torch.Tensor], dest: Path, config: dict | None) -> None:
    """A model folder (model.safetensors [+ config.json]) written as .tmp-<name>, then renamed."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    fsync_path(tmp / "model.safetensors")
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        fsync_path(tmp / "config.json")
    fsync_path(tmp)
    if dest.exists():  # landed before a crash but never entered the manifest: replace it
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    fsync_path(dest.parent)


# ---- checks at open ----

def check_writable(root: Path) -> None:
    """Create root and prove it writable by creating and removing a file; GeometryError if not."""
    probe = root / f".tmp-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GeometryError(f"cannot write the geometry store {root}: {e.strerror or e}") from None


def check_free_space(root: Path, snapshot_bytes: int, *, warn_snapshots: int = 10) -> None:
    """GeometryError when not even one snapshot fits; a warning when fewer than ``warn_snapshots`` do."""
    free = shutil.disk_usage(root).free
    if free < snapshot_bytes:
        raise GeometryError(f"not enough disk space for the geometry store {root}: one snapshot needs "
                            f"{snapshot_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")
    if free < warn_snapshots * snapshot_bytes:
        warnings.warn(f"geometry store {root}: only {free // snapshot_bytes} snapshots of "
                      f"{snapshot_bytes / 2**20:.1f} MiB fit in the free disk space", stacklevel=3)


# ---- reading ----

def read_manifest(run_dir: str | Path) -> Manifest:
    path = Path(run_dir) / MANIFEST
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise GeometryError(f"{run_dir}: not a geometry store (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GeometryError(f"{path}: unreadable manifest ({e})") from None
    if d.get("format") != FORMAT or d.get("version") not in READS:
        raise GeometryError(f"{path}: not a {FORMAT} manifest of version {', '.join(map(str, READS))}")
    return Manifest(d["base"]["label"], d["base"]["sha256"], d["tensors"], d["settings"], d["steps"],
                    d["tracking_steps"], d.get("final_step"))


def read_snapshot(run_dir: str | Path, step: int | None) -> dict[str, torch.Tensor]:
    """The tracked tensors at a snapshot step, or the base (step None), in their stored dtype."""
    folder = "base" if step is None else f"checkpoint-{step}"
    return load_file(Path(run_dir) / folder / "model.safetensors")


def read_tracking(run_dir: str | Path, step: int) -> dict[str, Tracked]:
    """Every tracked matrix's state at a tracking step; u, v upcast to float32."""
    path = Path(run_dir) / "tracking" / f"{step}.safetensors"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        groups = json.loads((f.metadata() or {}).get("groups", "null"))
        raw = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    if groups is None:  # version 1: "<name>:stats", "<name>:s", ... per matrix
        groups = [[key.removesuffix(":stats")] for key in raw if key.endswith(":stats")]
        raw = {f"{g}:{part}": raw[f"{names[0]}:{part}"][None] for g, names in enumerate(groups)
               for part in ("stats", "s", "u", "v")}
    out = {}
    for g, names in enumerate(groups):
        stats, s, u, v = (raw[f"{g}:{part}"] for part in ("stats", "s", "u", "v"))
        for i, name in enumerate(names):
            fro, iters, res, exact = stats[i].tolist()
            out[name] = Tracked(fro, s[i].float(), u[i].float(), v[i].float(), int(iters), res, bool(exact))
    return out


def encode_tracking(records: Mapping[str, Tracked], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """Tracked records -> (tensors, metadata) of a tracking file: stacked by shape, u and v cast to ``dtype``.

    A few tensors per shape rather than four per matrix: writing a file costs Python time per tensor, and
    the writer thread holds the GIL for it (measured: 2-3 ms a step for 28 matrices, now ~0.3 ms).
    """
    by_shape: dict[tuple, list[str]] = {}
    for name, t in records.items():
        by_shape.setdefault((tuple(t.s.shape), tuple(t.u.shape), tuple(t.v.shape)), []).append(name)
    tensors = {}
    for g, names in enumerate(by_shape.values()):
        recs = [records[n] for n in names]
        tensors[f"{g}:stats"] = torch.tensor([[t.fro, t.iters, t.residual, float(t.exact)] for t in recs],
                                             dtype=torch.float64)
        tensors[f"{g}:s"] = torch.stack([t.s.detach() for t in recs]).to("cpu", torch.float32)
        tensors[f"{g}:u"] = torch.stack([t.u.detach() for t in recs]).to("cpu", dtype)
        tensors[f"{g}:v"] = torch.stack([t.v.detach() for t in recs]).to("cpu", dtype)
    return tensors, {"groups": json.dumps(list(by_shape.values()))}


# ---- writing ----

class _Writer:
    """One daemon thread running queued jobs in order; the first error is kept for the caller."""

    def __init__(self, queue_size: int, idle: Callable[[], None] = lambda: None):
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._idle = idle  # run when no job came for COMMIT_SECONDS
        self._errors: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="geometry-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=COMMIT_SECONDS)
            except queue.Empty:
                self._do("the manifest", self._idle)
                continue
            try:
                if item is None:
                    return
                self._do(*item)
            finally:
                self._q.task_done()

    def _do(self, what: str, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            with self._lock:
                self._errors.append((what, e))

    def submit(self, what: str, job: Callable[[], None]) -> None:
        self._q.put((what, job))  # blocks while the queue is full: bounded memory

    def errors(self) -> list[tuple[str, BaseException]]:
        with self._lock:
            errs, self._errors = self._errors, []
        return errs

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


class Store:
    """Writer of one geometry store (layout in the module docstring). Use ``Store.open``."""

    def __init__(self, root: Path, manifest: dict, config: dict | None, queue_size: int, on_error: str):
        self.root, self._man, self._config, self.on_error = root, manifest, config, on_error
        self._lock = threading.Lock()
        self._dirty = False  # the manifest in memory differs from the one on disk
        self._written = time.monotonic()  # when the manifest was last written
        self._writer = _Writer(queue_size, idle=self._commit_pending)
        self._closed = False
        atexit.register(self._drain_at_exit)

    @classmethod
    def open(cls, path: str | Path, base_tensors: Mapping[str, torch.Tensor] | None, *, settings: dict,
             label: str = "base", config: dict | None = None, snapshot_bytes: int | None = None,
             queue_size: int = 2, on_error: str = "raise") -> Store:
        """Create a store, or reopen one to resume.

        base_tensors: the tracked tensors at step 0. Given for an existing store, their hash must match
        its base; None (a run resumed mid-way, whose model is no longer the base) reads the store's base.
        settings: JSON-able settings recorded in the manifest; reopening with other settings is refused.
        config: the model's config, copied into base/ and every snapshot so readers can split fused matrices.
        """
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', not {on_error!r}")
        root = Path(path)
        check_writable(root)
        if (root / MANIFEST).exists():
            man = _reopen(root, base_tensors, settings)
        else:
            man = _create(root, base_tensors, settings, label, config, snapshot_bytes)
        return cls(root, man, config, queue_size, on_error)

    @property
    def last_step(self) -> int | None:
        """The last step with complete data: a resumed run skips steps <= it. None for a new store."""
        with self._lock:
            return _complete(self._man)

    def base(self) -> dict[str, torch.Tensor]:
        return read_snapshot(self.root, None)

    def put_snapshot(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Queue checkpoint-<step>; tensors must be CPU copies the caller no longer touches."""
        self._check()

        def job():
            _save_folder(tensors, self.root / f"checkpoint-{step}", self._config)
            self._commit("steps", step)

        self._writer.submit(f"snapshot of step {step}", job)

    def put_tracking(self, step: int, records: Mapping[str, Tracked], dtype: torch.dtype = torch.float16) -> None:
        """Queue tracking/<step>.safetensors (u, v stored as ``dtype``)."""
        self._check()
        tensors, metadata = encode_tracking(records, dtype)

        def job():
            save_atomic(self.root / "tracking" / f"{step}.safetensors", tensors, metadata)
            self._commit("tracking_steps", step, now=False)

        self._writer.submit(f"tracking of step {step}", job)

    def flush(self) -> None:
        """Wait until every queued write has landed; report writer errors. A no-op once closed."""
        if self._closed:
            return
        landed = threading.Event()

        def job():
            self._commit_pending()
            landed.set()

        self._writer.submit("flush", job)  # the writer runs jobs in order: all earlier ones are done
        landed.wait()
        self._check()

    def close(self, final_step: int | None = None) -> None:
        """Finish the queued writes, record ``final_step`` (a clean end), report writer errors."""
        if self._closed:
            return

        def job():
            if final_step is not None:
                with self._lock:
                    self._man["final_step"], self._dirty = final_step, True
            self._commit_pending()

        self._writer.submit("manifest", job)
        self._closed = True
        self._writer.close()
        atexit.unregister(self._drain_at_exit)
        self._check()

    def _commit(self, key: str, step: int, now: bool = True) -> None:
        """Record a landed step in the manifest's list ``key``; write it now, or (``now=False``) once
        COMMIT_SECONDS have passed since the last write (module docstring). Writer thread only."""
        with self._lock:
            if not self._man[key] or step > self._man[key][-1]:
                self._man[key].append(step)  # the usual case: O(1), not O(steps)
            else:
                self._man[key] = sorted(set(self._man[key]) | {step})
            self._dirty = True
        if now or time.monotonic() - self._written >= COMMIT_SECONDS:
            self._commit_pending()

    def _commit_pending(self) -> None:
        """Write the manifest if it changed since its last write. Writer thread only."""
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps(self._man).encode()  # no indent: the C encoder (the writer thread holds the GIL)
            self._dirty = False
        write_atomic(self.root / MANIFEST, data)
        self._written = time.monotonic()

    def _check(self) -> None:
        for what, err in self._writer.errors():
            msg = f"geometry store {self.root}: {what} failed: {err}"
            if self.on_error == "raise":
                raise GeometryError(msg) from err
            warnings.warn(msg, stacklevel=3)

    def _drain_at_exit(self) -> None:
        """At interpreter exit (e.g. training crashed), finish what was queued; never raise."""
        self._closed = True
        self._writer.close()
        for what, err in self._writer.errors():
            warnings.warn(f"geometry store {self.root}: {what} failed: {err}", stacklevel=1)


def _create(root: Path, base_tensors, settings: dict, label: str, config: dict | None,
            snapshot_bytes: int | None) -> dict:
    if base_tensors is None:
        raise GeometryError(f"{root}: no geometry store to resume (its base, W0, is unknown)")
    marker = root / CREATING
    unfinished = marker.exists()  # a creation killed before its manifest landed: its leftovers are ours
    ours = {CREATING, "base", "tracking"} if unfinished else set()
    if any(not p.name.startswith(".tmp") and p.name not in ours for p in root.iterdir()):
        raise GeometryError(f"{root}: not empty and not a geometry store; give an empty or new folder")
    base = {n: base_tensors[n].detach().cpu().contiguous() for n in sorted(base_tensors)}
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    check_free_space(root, nbytes + (snapshot_bytes if snapshot_bytes is not None else nbytes))
    _clean(root, [], [])
    for name in ("base", "tracking"):
        if unfinished:
            shutil.rmtree(root / name, ignore_errors=True)
    write_atomic(marker, b"a geometry store is being created here\n")
    _save_folder(base, root / "base", config)
    (root / "tracking").mkdir(exist_ok=True)
    man = {"format": FORMAT, "version": VERSION, "base": {"label": label, "sha256": base_hash(base)},
           "tensors": [{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in base.items()],
           "settings": settings, "steps": [], "tracking_steps": [], "final_step": None}
    write_atomic(root / MANIFEST, json.dumps(man, indent=1).encode())
    marker.unlink()
    return man


def _reopen(root: Path, base_tensors, settings: dict) -> dict:
    m = read_manifest(root)
    try:
        given = base_tensors if base_tensors is not None else read_snapshot(root, None)
    except Exception as e:  # noqa: BLE001 - any unreadable base is the same problem for the user
        raise GeometryError(f"store {root}: unreadable base/ ({e})") from None
    sha = base_hash(given)
    if sha != m.base_sha256:
        what = "was made from another base" if base_tensors is not None else "has a corrupt base/"
        raise GeometryError(f"store {root} {what} (sha256 {m.base_sha256[:12]}..., given {sha[:12]}...)")
    norm = json.loads(json.dumps(settings))
    changed = sorted(k for k in set(norm) | set(m.settings) if norm.get(k) != m.settings.get(k))
    if changed:
        raise GeometryError(f"store {root} was made with other settings ({', '.join(changed)}); "
                            "use a new folder")
    man = json.loads((root / MANIFEST).read_text())
    adopted = _landed_tracking(root, man["tracking_steps"])
    man["tracking_steps"] = sorted(set(man["tracking_steps"]) | set(adopted))
    # A step's snapshot is queued before its tracking: a kill between the two leaves a snapshot whose step
    # is not complete. Drop it, so that the resumed run records that step again, whole.
    done = _complete(man)
    if adopted or (done is not None and any(s > done for s in man["steps"])):
        man["steps"] = [s for s in man["steps"] if done is None or s <= done]
        write_atomic(root / MANIFEST, json.dumps(man, indent=1).encode())
    _clean(root, man["steps"], man["tracking_steps"])
    (root / "tracking").mkdir(exist_ok=True)
    return man


def _landed_tracking(root: Path, listed: list[int]) -> list[int]:
    """Steps of the whole tracking files that landed after the manifest's last rewrite (module docstring)."""
    folder, listed, steps = root / "tracking", set(listed), []
    if not folder.is_dir():
        return steps
    for p in folder.iterdir():
        m = _STEP_FILE.fullmatch(p.name)
        if m and int(m.group(1)) not in listed:
            try:
                with safe_open(p, "pt") as f:  # checks the header against the file's size
                    f.metadata()
            except Exception:  # noqa: BLE001 - not whole: _clean deletes it
                continue
            steps.append(int(m.group(1)))
    return steps


def _complete(man: dict) -> int | None:
    """The last step whose every write landed: with tracking on, every recorded step has tracking,
    written after the step's snapshot; without it, snapshots are all there is."""
    every = man["settings"].get("track_every")
    if every is None:  # a store written without a recorder's settings: any landed step counts
        done = man["steps"] + man["tracking_steps"]
    else:
        done = man["tracking_steps"] if every > 0 else man["steps"]
    return max(done) if done else None


def _clean(root: Path, steps: list[int], tracking_steps: list[int]) -> None:
    """Delete unfinished writes (.tmp*) and data the manifest does not list."""
    for folder, keep, pattern in ((root, set(steps), _CHECKPOINT), (root / "tracking", set(tracking_steps),
                                                                       _STEP_FILE)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = pattern.fullmatch(p.name)
            if p.name.startswith(".tmp") or (m and int(m.group(1)) not in keep):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
