"""DeepSpeed ZeRO checkpoints read as the model they hold, through DeepSpeed's own ``zero_to_fp32``.

``engine.save_checkpoint(dir)`` writes ``dir/global_stepN/`` (the model states and each rank's partition of the
fp32 master weights, ``*_optim_states.pt``) and ``dir/latest`` naming it. A ``global_stepN`` folder is step N, a
folder of them a run, and a folder whose ``latest`` names one (a Trainer ``checkpoint-N`` saved under ZeRO-3
without 16-bit weights) that checkpoint. The weights read are the fp32 masters, as ``zero_to_fp32`` rebuilds them.

The files are pickles of DeepSpeed objects, which DeepSpeed unpickles in full (``weights_only=False``): refused
unless the caller opts in, and read only where DeepSpeed is installed (``pip install geometry[deepspeed]``).
DeepSpeed maps the partitions (``mmap=True``), and a read copies one parameter out of them: ZeRO-3 through its
lazy ``GatheredTensor``; ZeRO-1/2, whose own rebuild concatenates every partition (the whole fp32 model, in memory
for as long as the checkpoint is open), by running that rebuild on meta tensors shaped like the partitions, which
gives each parameter's offset (alignment paddings and DeepSpeed's consistency check included) without data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import re
from pathlib import Path

import torch

from geometry.buffers import Scratch
from geometry.errors import GeometryError, one_line
from geometry.offline.locate import PICKLE_REFUSED, read_json
from geometry.offline.sources import Checkpoint, TensorSource

STEP = re.compile(r"global_step(\d+)")  # DeepSpeed's default tag
EXTRA = "pip install geometry[deepspeed]"


def _has_states(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*_model_states.pt"))


def step_dirs(run: Path) -> list[tuple[int, Path]]:
    """The ``global_stepN`` subfolders of a run, in step order."""
    found = [(int(m.group(1)), d) for d in run.iterdir() if d.is_dir() and (m := STEP.fullmatch(d.name))]
    return sorted(found)


def open_step(d: Path, allow_pickle: bool) -> Checkpoint | None:
    """``d`` as one ZeRO checkpoint: a ``global_stepN`` folder (step N), or a folder whose ``latest`` file names
    one; None when it is neither."""
    step_dir = d if STEP.fullmatch(d.name) else None
    latest = d / "latest"
    if step_dir is None and latest.is_file() and latest.stat().st_size < 1024:
        tag = latest.read_text(errors="replace").strip()
        step_dir = d / tag if tag and Path(tag).name == tag and (d / tag).is_dir() else None
    if step_dir is None:
        return None
    if not _has_states(step_dir):
        raise GeometryError(f"{step_dir}: a DeepSpeed checkpoint folder without model states (*_model_states.pt)")
    if not allow_pickle:
        raise GeometryError(f"{step_dir}: DeepSpeed ZeRO checkpoints are pickles; {PICKLE_REFUSED}")
    states = ZeroStates(step_dir)
    config = read_json(step_dir / "config.json") or read_json(step_dir.parent / "config.json")
    note = f"{step_dir.name}: DeepSpeed ZeRO-{3 if states.stage3 else '1/2'}, fp32 master weights (zero_to_fp32)"
    m = STEP.fullmatch(step_dir.name)
    return Checkpoint(int(m.group(1)) if m else None,
                      TensorSource(str(step_dir), dict.fromkeys(states.meta, states), config, [note]), step_dir.name)


def _zero_to_fp32():
    """DeepSpeed's module, imported without its line on stdout about the accelerator it picked."""
    log = logging.getLogger("DeepSpeed")  # deepspeed.utils.logger

    def drop(record):
        return False

    log.addFilter(drop)
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError:
        raise GeometryError(f"reading DeepSpeed ZeRO checkpoints needs DeepSpeed: {EXTRA}") from None
    finally:
        log.removeFilter(drop)
    return zero_to_fp32


class _Flat:
    """One parameter of a ZeRO-1/2 checkpoint: ``numel`` entries from ``offset`` of a param group's fp32 vector,
    which the ranks' partitions make end to end."""

    def __init__(self, parts: list[torch.Tensor], offset: int, shape: torch.Size):
        self.parts, self.offset, self.shape, self.dtype = parts, offset, shape, parts[0].dtype

    def contiguous(self) -> torch.Tensor:
        stop, at, pieces = self.offset + math.prod(self.shape), 0, []
        for part in self.parts:
            a, b = max(self.offset, at), min(stop, at + part.numel())
            if a < b:
                pieces.append(part[a - at:b - at])
            at += part.numel()
        flat = torch.cat(pieces) if len(pieces) != 1 else pieces[0].clone()
        return flat.view(self.shape)


def _zero2(z, step_dir: Path) -> dict:
    """name -> ``_Flat`` (or a buffer or frozen tensor) of a ZeRO-1/2 checkpoint, laid out by DeepSpeed's own
    ``_zero2_merge_trainable_params`` run on meta tensors, a param group at a time (a view's storage offset is
    the parameter's offset in its group's vector)."""
    states = z.parse_model_states(z.get_model_state_files(str(step_dir)))
    stage, world, groups, *rest = z.parse_optim_states(z.get_optim_files(str(step_dir)), str(step_dir))
    paddings = rest[0] if rest else None
    out: dict = dict(states[0].buffers)
    z._zero2_merge_frozen_params(out, states)
    for g, shapes in enumerate(states[0].param_shapes):
        meta = [[torch.empty(groups[r][g].numel(), dtype=groups[r][g].dtype, device="meta")] for r in range(world)]
        views: dict = {}
        args = () if paddings is None else ([paddings[g]],)
        z._zero2_merge_trainable_params(views, world, meta, [dataclasses.replace(states[0], param_shapes=[shapes])],
                                        *args)
        parts = [groups[r][g] for r in range(world)]
        out.update({n: _Flat(parts, v.storage_offset(), v.shape) for n, v in views.items()})
    for name, target in states[0].shared_params:  # tied weights: one tensor under two names
        if target in out:
            out[name] = out[target]
    return out


class ZeroStates:
    """The fp32 master weights of one ``global_stepN`` folder, read as one file of full tensors (what
    geometry.offline.sources' TensorSource holds: ``path``, ``meta``, ``dtype``, ``read``)."""

    def __init__(self, step_dir: Path):
        z = _zero_to_fp32()
        self.path = step_dir
        self.stage3 = (step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # zero_to_fp32's own test
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                self._tensors = (z.get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                                            lazy_mode=True)
                                 if self.stage3 else _zero2(z, step_dir))
        except Exception as e:  # DeepSpeed raises ValueError, FileNotFoundError, unpickling errors, ...
            raise GeometryError(f"{step_dir}: not a readable DeepSpeed ZeRO checkpoint ({one_line(e)})"
                                ) from None
        self.meta = {n: (tuple(t.shape), str(t.dtype)) for n, t in self._tensors.items()}

    def __repr__(self) -> str:
        return f"ZeroStates({str(self.path)!r}, {len(self.meta)} tensors)"

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, rows: slice | None, cols: slice | None = None, into: Scratch | None = None
             ) -> torch.Tensor:
        """One parameter rebuilt from the ranks' partitions (or its ``rows``, ``cols``), fp32, on the CPU."""
        t = self._tensors[name].contiguous().detach()  # DeepSpeed's fp32 partitions require grad
        t = t if rows is None else t[rows]
        return t if cols is None else t[:, cols]
