"""A run's geometry store: base, snapshots and per-step tracking, written atomically in the background.

Its parts: the folder layout and model folders (geometry.capture.layout), the manifest
(geometry.capture.manifest), tracking files (geometry.capture.trackfile), the writer thread
(geometry.capture.writer). Here: ``Store``, which creates, reopens (recovering from a crash) and writes
one, and ``check_store``, what a reader checks before it trusts one.

The manifest is rewritten atomically after each snapshot lands, so it is always valid JSON and lists
only complete data. Tracking files land one per step, and the manifest takes them in at most every
``commit_seconds`` (rewriting it at every step costs time that grows with the run: it lists every
step), at a snapshot, and at ``flush`` and ``close``. ``Store.open`` deletes unfinished writes and
snapshots that landed without their manifest entry (a crash between the two), and takes in the tracking
files that landed after the manifest's last rewrite (each is whole: it was renamed into place after an
fsync), so that a crash loses no landed step.

Long runs (store version 3): once ``chunk_steps`` step files (or CHUNK_BYTES of them) have landed, the
writer merges them into one chunk file, renamed into place whole, then lists the chunk in the manifest
(written at once), and only then deletes the step files. A crash before the manifest lands leaves an
unlisted chunk, which ``Store.open`` deletes (its step files are all still there); a crash after it
leaves step files inside a listed chunk, which it deletes too. 100k tracked steps are then a few hundred
files, quick to open and list (benchmarks/bench_store.py).
"""

from __future__ import annotations

import atexit
import bisect
import json
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from geometry.atomic import save_atomic, write_atomic
from geometry.capture.layout import (
    CREATING,
    LazySnapshot,
    check_free_space,
    check_writable,
    clean,
    foreign_entries,
    landed_tracking,
    missing_files,
    read_snapshot,
    save_folder,
)
from geometry.capture.manifest import MANIFEST, Manifest, base_hash, fingerprint, read_manifest
from geometry.capture.trackfile import chunk_path, encode, merge, read_chunk, read_tracking, tracking_path
from geometry.capture.tracking import Estimate
from geometry.capture.writer import Writer
from geometry.errors import GeometryError

# The store's readers, in one import: a store is read with these, and checked with check_store.
__all__ = ["Store", "check_store", "read_manifest", "read_snapshot", "read_tracking", "read_chunk", "iter_tracking",
           "base_hash",
           "Manifest", "COMMIT_SECONDS", "CHUNK_STEPS"]

COMMIT_SECONDS = 1.0  # the longest a landed tracking file waits for the manifest to list it (module docstring)
CHUNK_STEPS = 256  # step files merged into one chunk: 100k steps make ~400 files
CHUNK_BYTES = 64 * 2**20  # ... or fewer, once they hold this much; a step file of over CHUNK_BYTES / 8 stays alone


class Store:
    """Writer of one geometry store (module docstring). Use ``Store.open``; ``close`` it (or the store
    finishes its queued writes at interpreter exit)."""

    def __init__(self, root: Path, manifest: Manifest, config: dict | None, queue_size: int, on_error: str,
                 commit_seconds: float, chunk_steps: int):
        self.root, self.on_error, self._chunk_steps = root, on_error, chunk_steps
        self._merges = manifest.version >= 3 and chunk_steps >= 2  # step files are merged into chunks
        # the step files not yet merged, with their sizes (writer thread)
        self._loose = [(s, tracking_path(root, s).stat().st_size) for s in manifest.loose_steps()] if self._merges \
            else []
        self._man, self._config, self._commit_seconds = manifest, config, commit_seconds
        self._lock = threading.Lock()  # guards _man and _dirty, shared with the writer thread
        self._dirty = False  # the manifest in memory differs from the one on disk
        self._written = time.monotonic()  # when the manifest was last written
        self._writer = Writer(queue_size, idle=self._commit_pending, idle_seconds=commit_seconds)
        self._closed = False
        atexit.register(self._drain_at_exit)

    @classmethod
    def open(cls, path: str | Path, base_tensors: Mapping[str, torch.Tensor] | None, *, settings: dict,
             label: str = "base", config: dict | None = None, snapshot_bytes: int | None = None,
             queue_size: int = 2, on_error: str = "raise", commit_seconds: float = COMMIT_SECONDS,
             chunk_steps: int = CHUNK_STEPS) -> Store:
        """Create a store, or reopen one to resume.

        base_tensors: the tracked tensors at step 0. Given for an existing store, their hash must match
        its base; None (a run resumed mid-way, whose model is no longer the base) reads the store's base.
        settings: JSON-able settings recorded in the manifest; reopening with other settings is refused.
        config: the model's config, copied into base/ and every snapshot so readers can split fused matrices.
        on_error: a failed write is raised ("raise": at the next call, after which the store is closed) or
        warned about ("warn") on the training thread.
        chunk_steps: step files merged into one chunk file (module docstring); 0 or 1: none (a version 1-2
        store resumed never gets chunks).
        """
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', not {on_error!r}")
        root = Path(path)
        check_writable(root)
        if (root / MANIFEST).exists():
            man = _reopen(root, base_tensors, settings)
        else:
            man = _create(root, base_tensors, settings, label, config, snapshot_bytes)
        return cls(root, man, config, queue_size, on_error, commit_seconds, chunk_steps)

    @property
    def last_step(self) -> int | None:
        """The last step with complete data: a resumed run skips steps <= it. None for a new store."""
        with self._lock:
            return self._man.last_complete()

    def base(self) -> dict[str, torch.Tensor]:
        return read_snapshot(self.root, None)

    def put_snapshot(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Queue checkpoint-<step>; tensors must be CPU copies the caller no longer touches."""
        self._check()

        def job():
            save_folder(tensors, self.root / f"checkpoint-{step}", self._config)
            self._commit(self._man.add_snapshot, step)

        self._submit(f"snapshot of step {step}", job)

    def put_tracking(self, step: int, records: Mapping[str, Estimate], dtype: torch.dtype = torch.float16) -> None:
        """Queue tracking/<step>.safetensors: each matrix's Estimate (its top K), u and v stored as ``dtype``."""
        self._check()
        tensors, metadata = encode(records, dtype)

        def job():
            path = tracking_path(self.root, step)
            save_atomic(path, tensors, metadata)
            self._commit(self._man.add_tracking, step, now=False)
            if self._merges:
                self._loose.append((step, path.stat().st_size))
                self._merge_if_due()

        self._submit(f"tracking of step {step}", job)

    def flush(self) -> None:
        """Wait until every queued write has landed; report writer errors. A no-op once closed."""
        if self._closed:
            return
        landed = threading.Event()

        def job():
            self._commit_pending()
            landed.set()

        self._submit("flush", job)  # the writer runs jobs in order: all earlier ones are done
        landed.wait()
        self._check()

    def close(self, final_step: int | None = None) -> None:
        """Finish the queued writes, record ``final_step`` (a clean end), report writer errors."""
        if self._closed:
            return

        def job():
            if final_step is not None:
                with self._lock:
                    self._man.final_step, self._dirty = final_step, True
            self._commit_pending()

        self._submit("manifest", job)
        self._shut_down()
        self._check()

    # ---- internals ----

    def _submit(self, what: str, job: Callable[[], None]) -> None:
        if self._closed:
            raise GeometryError(f"geometry store {self.root} is closed")
        self._writer.submit(what, job)

    def _commit(self, add: Callable[[int], None], step: int, now: bool = True) -> None:
        """Record a landed step in the manifest (``add``); write it now, or (``now=False``) once commit_seconds
        have passed since the last write (module docstring). Writer thread only."""
        with self._lock:
            add(step)
            self._dirty = True
        if now or time.monotonic() - self._written >= self._commit_seconds:
            self._commit_pending()

    def _merge_if_due(self) -> None:
        """Merge the step files into a chunk when enough have landed (module docstring). Writer thread only."""
        n, nbytes = len(self._loose), sum(size for _, size in self._loose)
        if n < 2 or self._loose[-1][1] > CHUNK_BYTES // 8 or (n < self._chunk_steps and nbytes < CHUNK_BYTES):
            return
        steps = [s for s, _ in self._loose]
        chunk = (steps[0], steps[-1])
        tensors, metadata = merge({s: tracking_path(self.root, s) for s in steps})
        save_atomic(chunk_path(self.root, chunk), tensors, metadata)
        self._commit(self._man.add_chunk, chunk)  # the manifest lists the chunk now ...
        for s in steps:  # ... and only then do its step files go
            tracking_path(self.root, s).unlink()
        self._loose = []

    def _commit_pending(self) -> None:
        """Write the manifest if it changed since its last write. Writer thread only."""
        with self._lock:
            if not self._dirty:
                return
            data = self._man.to_json()
            self._dirty = False
        write_atomic(self.root / MANIFEST, data)
        self._written = time.monotonic()

    def _check(self) -> None:
        """Report the writer's errors on the caller's thread. Raising closes the store first: its writer thread
        ends now rather than at exit (later writes would only fail the same way)."""
        errors = self._writer.errors()
        if errors and self.on_error == "raise":
            self._shut_down()  # the queued jobs run first; their errors are this failure again, left unreported
            what, err = errors[0]
            raise GeometryError(f"geometry store {self.root}: {what} failed: {err}") from err
        for what, err in errors:
            warnings.warn(f"geometry store {self.root}: {what} failed: {err}", stacklevel=3)

    def _shut_down(self) -> None:
        self._closed = True
        self._writer.close()
        atexit.unregister(self._drain_at_exit)

    def _drain_at_exit(self) -> None:
        """At interpreter exit (e.g. training crashed), finish what was queued; never raise."""
        self._closed = True
        self._writer.close()
        for what, err in self._writer.errors():
            warnings.warn(f"geometry store {self.root}: {what} failed: {err}", stacklevel=1)


def iter_tracking(run_dir: str | Path, man: Manifest) -> Iterator[tuple[int, dict[str, Estimate]]]:
    """(step, Estimates) of every tracking step the manifest lists, in step order; each chunk file opened once."""
    steps, i = man.tracking_steps, 0
    while i < len(steps):
        chunk = man.chunk_of(steps[i])
        if chunk is None:
            yield steps[i], read_tracking(run_dir, steps[i])
            i += 1
            continue
        j = bisect.bisect_right(steps, chunk[1])
        yield from sorted(read_chunk(run_dir, chunk, steps[i:j]).items())
        i = j


def check_store(run_dir: str | Path) -> Manifest:
    """A store as a reader may trust it: a valid manifest, every file it lists present, and the base it names
    (sha256 and tensor list) in base/. GeometryError, one line, otherwise. Reads the whole base once, a tensor
    at a time."""
    man = _listed_files_present(Path(run_dir), read_manifest(run_dir))
    _check_base(Path(run_dir), man, LazySnapshot(run_dir, None), given=False)
    return man


def _listed_files_present(root: Path, man: Manifest) -> Manifest:
    missing = missing_files(root, man)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GeometryError(f"store {root}: its manifest lists {missing[0].relative_to(root)}, which is "
                            f"missing{more}")
    return man


def _check_base(root: Path, man: Manifest, base: Mapping[str, torch.Tensor], given: bool) -> None:
    sha, infos = fingerprint(base)
    if sha != man.base_sha256:
        what = "was made from another base" if given else "has a base/ other than the one its manifest names"
        raise GeometryError(f"store {root} {what} (sha256 {man.base_sha256[:12]}..., "
                            f"{'given' if given else 'base/ has'} {sha[:12]}...)")
    if infos != man.tensors:
        raise GeometryError(f"store {root}: its manifest lists other tensors (names, shapes or dtypes) than "
                            f"{'the base given' if given else 'base/ holds'}")


def _create(root: Path, base_tensors: Mapping[str, torch.Tensor] | None, settings: dict, label: str,
            config: dict | None, snapshot_bytes: int | None) -> Manifest:
    if base_tensors is None:
        raise GeometryError(f"{root}: no geometry store to resume (its base, W0, is unknown)")
    if foreign_entries(root):
        raise GeometryError(f"{root}: not empty and not a geometry store; give an empty or new folder")
    unfinished = (root / CREATING).exists()  # a creation killed before its manifest landed: its leftovers go
    base = {n: base_tensors[n].detach().cpu().contiguous() for n in sorted(base_tensors)}
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    check_free_space(root, nbytes + (snapshot_bytes if snapshot_bytes is not None else nbytes))
    clean(root, None)
    for name in ("base", "tracking"):
        if unfinished:
            shutil.rmtree(root / name, ignore_errors=True)
    write_atomic(root / CREATING, b"a geometry store is being created here\n")
    save_folder(base, root / "base", config)
    (root / "tracking").mkdir(exist_ok=True)
    man = Manifest(label, *fingerprint(base), json.loads(json.dumps(settings)))
    write_atomic(root / MANIFEST, man.to_json(indent=1))
    (root / CREATING).unlink()
    return man


def _reopen(root: Path, base_tensors: Mapping[str, torch.Tensor] | None, settings: dict) -> Manifest:
    man = _listed_files_present(root, read_manifest(root))
    _check_base(root, man, base_tensors if base_tensors is not None else LazySnapshot(root, None),
                given=base_tensors is not None)
    norm = json.loads(json.dumps(settings))
    changed = sorted(k for k in set(norm) | set(man.settings) if norm.get(k) != man.settings.get(k))
    if changed:
        raise GeometryError(f"store {root} was made with other settings ({', '.join(changed)}); use a new folder")
    adopted = landed_tracking(root, man)
    for step in sorted(adopted):
        man.add_tracking(step)
    # A step's snapshot is queued before its tracking: a kill between the two leaves a snapshot whose step
    # is not complete. Drop it, so that the resumed run records that step again, whole.
    done = man.last_complete()
    if adopted or (done is not None and any(s > done for s in man.steps)):
        man.steps = [s for s in man.steps if done is None or s <= done]
        write_atomic(root / MANIFEST, man.to_json(indent=1))
    clean(root, man)
    (root / "tracking").mkdir(exist_ok=True)
    return man
