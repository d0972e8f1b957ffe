"""A store's folder on disk: where each file lives, model folders written atomically, checks and cleanup.

    geometry-store.json                manifest (geometry.capture.manifest)
    base/model.safetensors             the tracked tensors at step 0 [+ config.json]: the store is self-contained
    checkpoint-<N>/model.safetensors   the tracked tensors at step N, stored dtype (bf16 stays bf16) [+ config.json]
    tracking/<N>.safetensors           every tracked matrix's Estimate at step N (geometry.capture.trackfile)
    tracking/chunk-<A>-<B>.safetensors the same for each tracking step from A to B (version 3: merged step files)

``geometry analyze RUN/base RUN`` reads it as a Trainer run. Every file is written under a ``.tmp-`` name in
its final folder, fsynced, renamed, and the folder fsynced (geometry.atomic); a model folder is
``.tmp-checkpoint-N`` until renamed. Readers ignore ``.tmp*``; reopening a store deletes them (``clean``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geometry.atomic import TMP, fsync_path
from geometry.capture.manifest import MANIFEST, Manifest
from geometry.capture.trackfile import chunk_path, tracking_path
from geometry.errors import GeometryError, one_line

CREATING = ".geometry-store-creating"  # present from the first byte of a new store until its manifest lands
_STEP_FILE = re.compile(r"(\d+)\.safetensors")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_CHUNK_FILE = re.compile(r"chunk-(\d+)-(\d+)\.safetensors")


def snapshot_path(run_dir: str | Path, step: int | None) -> Path:
    """model.safetensors of a snapshot step, or of the base (step None)."""
    return Path(run_dir) / ("base" if step is None else f"checkpoint-{step}") / "model.safetensors"


def save_folder(tensors: dict[str, torch.Tensor], dest: Path, config: dict | None) -> None:
    """A model folder (model.safetensors [+ config.json]) written as .tmp-<name>, then renamed over dest."""
    tmp = dest.with_name(f"{TMP}{dest.name}")
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


def read_snapshot(run_dir: str | Path, step: int | None) -> dict[str, torch.Tensor]:
    """The tracked tensors at a snapshot step, or the base (step None), in their stored dtype."""
    path = _existing_snapshot(run_dir, step)
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError or OSError: the same problem for the user
        raise _unreadable(path, e) from None


class LazySnapshot(Mapping):
    """A snapshot's tensors, each read from its file when asked: one in memory at a time (a store's whole
    base is checked this way, never loaded whole)."""

    def __init__(self, run_dir: str | Path, step: int | None):
        self.path = _existing_snapshot(run_dir, step)
        with self._open() as f:
            self._names = sorted(f.keys())

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except Exception as e:  # noqa: BLE001 - SafetensorError or OSError: the same problem for the user
            raise _unreadable(self.path, e) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        with self._open() as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt tensor
                raise _unreadable(self.path, e) from None

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _existing_snapshot(run_dir: str | Path, step: int | None) -> Path:
    path = snapshot_path(run_dir, step)
    if not path.is_file():
        raise GeometryError(f"{path}: missing ({'the base' if step is None else f'snapshot of step {step}'})")
    return path


def _unreadable(path: Path, e: Exception) -> GeometryError:
    return GeometryError(f"{path}: unreadable ({one_line(e)})")


def missing_files(run_dir: str | Path, man: Manifest) -> list[Path]:
    """The files the manifest lists that are not there (it lists only landed files: none, unless edited)."""
    listed = [snapshot_path(run_dir, None), *(snapshot_path(run_dir, s) for s in man.steps),
              *(chunk_path(run_dir, c) for c in man.tracking_chunks),
              *(tracking_path(run_dir, s) for s in man.loose_steps())]
    return [p for p in listed if not p.is_file()]


def check_writable(root: Path) -> None:
    """Create root and prove it writable by creating and removing a file; GeometryError if not."""
    probe = root / f"{TMP}probe-{os.getpid()}"
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


def foreign_entries(root: Path) -> list[str]:
    """Names in root that a store being created cannot claim: a new store needs an empty folder, apart from
    unfinished writes and (when a creation was killed before its manifest landed) that creation's leftovers."""
    ours = {CREATING, "base", "tracking"} if (root / CREATING).exists() else set()
    return [p.name for p in root.iterdir() if not p.name.startswith(".tmp") and p.name not in ours]


def landed_tracking(root: Path, man: Manifest) -> list[int]:
    """Steps of the whole tracking files that landed after the manifest's last rewrite (geometry.capture.store).
    Only after its last chunk: a chunk is listed only after every step file merged into it was."""
    folder, listed, steps = root / "tracking", set(man.loose_steps()), []
    after = man.tracking_chunks[-1][1] if man.tracking_chunks else -1
    if not folder.is_dir():
        return steps
    for p in folder.iterdir():
        m = _STEP_FILE.fullmatch(p.name)
        if m and int(m.group(1)) not in listed and int(m.group(1)) > after:
            try:
                with safe_open(p, "pt") as f:  # checks the header against the file's size
                    f.metadata()
            except Exception:  # noqa: BLE001 - not whole: clean deletes it
                continue
            steps.append(int(m.group(1)))
    return steps


def clean(root: Path, man: Manifest | None) -> None:
    """Delete unfinished writes (.tmp*) and data the manifest does not list: snapshots, step files (also those
    already merged into a listed chunk: a crash before their deletion) and chunks (a crash before the manifest
    listed one: its step files are still there). man None: a store being created, which lists nothing."""
    listed = {_CHECKPOINT: {(s,) for s in man.steps} if man else set(),
              _STEP_FILE: {(s,) for s in man.loose_steps()} if man else set(),
              _CHUNK_FILE: set(man.tracking_chunks) if man else set()}
    for folder, patterns in ((root, (_CHECKPOINT,)), (root / "tracking", (_STEP_FILE, _CHUNK_FILE))):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".tmp") or any(_unlisted(p.name, pattern, listed[pattern]) for pattern in patterns):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _unlisted(name: str, pattern: re.Pattern, listed: set[tuple[int, ...]]) -> bool:
    m = pattern.fullmatch(name)
    return m is not None and tuple(int(g) for g in m.groups()) not in listed


def is_store(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()
