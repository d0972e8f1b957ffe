"""Atomic writes: a reader sees the old file or the new one, never half of one, even after a crash.

Every file is written under a ``.tmp-`` name in its final folder, flushed and fsynced, renamed over the
destination with os.replace, and the folder fsynced so that the rename itself is durable. Readers of
this project ignore ``.tmp*`` names; writers clean them up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

TMP = ".tmp-"  # prefix of every unfinished write


def tmp_name(dest: Path) -> Path:
    return dest.with_name(f"{TMP}{dest.name}")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: Path, dest: Path) -> None:
    """Make tmp durable, rename it to dest, make the rename durable."""
    fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(dest.parent)


def write_atomic(dest: Path, data: bytes) -> None:
    """Write bytes to dest atomically; on failure the temporary file is removed and dest is untouched."""
    tmp = tmp_name(dest)
    try:
        tmp.write_bytes(data)
        replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(dest: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file written atomically."""
    tmp = tmp_name(dest)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
