"""Where a model named on the command line lives, which files hold its weights, what to call it, which step.

A name is a local path (a model folder, a weights file, a Trainer run, a Hugging Face cache snapshot whose
files are symlinks into ``blobs/``) or, when no such path exists, a hub name ``org/model`` looked up in
huggingface_hub's local cache (HF_HUB_CACHE / HF_HOME), downloaded (safetensors and JSON files only) when
the hub is online. A step is read only where training wrote one: a Trainer ``checkpoint-N`` name or
``trainer_state.json``'s ``global_step``; ``phi-2`` or ``step_300`` are names, not steps. A folder's weights
are its safetensors (one file, or shards listed by an index that may not point outside the folder), else,
opted in, its pickles; a symlink among them that loops or leads nowhere is an error, not a skip.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from geometry.errors import GeometryError, one_line

CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's folder name
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_FILES = ["*.safetensors", "*.json"]  # never the pickles a repo may also hold
MAX_JSON_BYTES = 100_000_000  # config.json, trainer_state.json, index files: real ones are far smaller
_WEIGHT_NAMES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?")  # file names that say nothing of the model
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_REFUSED = ("pickle checkpoints are refused (unpickling can run code); convert to safetensors "
                  "or opt in with --allow-pickle (allow_pickle=True)")


def stat_problem(p: Path) -> str | None:
    """Why p cannot be opened, in words (symlink loop, dangling symlink, ...); None when it can."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOENT and os.path.islink(p):
            return f"a symlink to {os.readlink(p)}, which does not exist"
        if e.errno == errno.ENOENT:
            return "no such file or directory"
        return e.strerror or str(e)
    return None


def locate(path: str | Path) -> tuple[Path, str | None]:
    """(local path, hub name or None) of a model named on the command line."""
    p = Path(path)
    problem = stat_problem(p)
    if problem is None:
        return p, None
    text = str(path)
    first = Path(text.split("/", 1)[0])
    if problem == "no such file or directory" and HUB_NAME.fullmatch(text) and not first.is_dir():
        return _from_hub(text), text
    raise GeometryError(f"{p}: {problem}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(repo_id: str) -> Path:
    """The snapshot folder of a hub model in the local cache; fetched first when the hub is online."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise GeometryError(f"{repo_id}: no such file or directory (and huggingface_hub, which resolves hub "
                            "names, is not installed)") from None
    # read at call time: huggingface_hub reads its environment once, at import
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub"))
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE")
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache or None,
                                   local_files_only=offline)
    except Exception as e:  # huggingface_hub raises a dozen kinds: not found, gated, offline, HTTP, OS
        where = cache or constants.HF_HUB_CACHE
        if offline:
            raise GeometryError(f"{repo_id}: not a local path, and not in the Hugging Face cache {where} "
                                "(offline: HF_HUB_OFFLINE is set)") from None
        reason = one_line(e, 200)
        raise GeometryError(f"{repo_id}: not a local path, and the hub did not provide it ({reason})") from None
    return Path(folder)


def label_of(p: Path, hub: str | None) -> str:
    """A short name for outputs: the hub name, ``org/model`` of a cache snapshot, else the folder or file
    name (a file named model.safetensors is called after its folder)."""
    if hub:
        return hub
    p = Path(os.path.abspath(p))  # "." gets a name; symlinks keep the name the user gave them
    d = p if p.is_dir() else p.parent
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent.name.removeprefix("models--").replace("--", "/")
    if p.is_dir():
        return p.name
    stem = p.name.removesuffix(p.suffix)
    return d.name if _WEIGHT_NAMES.fullmatch(stem) else stem


def read_json(path: Path) -> dict | None:
    """A JSON object from a small file, None when there is no such file; GeometryError when it is not one."""
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
        doc = json.loads(path.read_bytes())
    except RecursionError:
        raise GeometryError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise GeometryError(f"{path}: not valid JSON ({one_line(e, 200)})") from None
    if not isinstance(doc, dict):
        raise GeometryError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def step_of(p: Path) -> int | None:
    """The step a single model was saved at: its folder (or file) is named checkpoint-N, or the
    trainer_state.json beside it says global_step; None when the files do not say."""
    d = p if p.is_dir() else p.parent
    for name in (d.name, *([p.name.removesuffix(p.suffix)] if p.is_file() else [])):
        m = CHECKPOINT.fullmatch(name)
        if m:
            return int(m.group(1))
    state = read_json(d / "trainer_state.json")
    if not state or "global_step" not in state:
        return None
    step = state["global_step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise GeometryError(f"{d / 'trainer_state.json'}: global_step is {str(step)[:40]!r}, not a step number")
    return step


def _plain_files(d: Path, kind: str) -> list[Path]:
    """The *.kind weight files of a folder; a link among them that leads nowhere is an error, not a skip."""
    files = []
    # training_args.bin is a pickled TrainingArguments that Trainer leaves in every checkpoint.
    for f in sorted(d.glob(f"*.{kind}")):
        problem = stat_problem(f)
        if problem:
            raise GeometryError(f"{f}: {problem}")
        if f.is_file() and f.name != "training_args.bin":
            files.append(f)
    return files


def _shards(index: Path, kind: str) -> dict[str, list[str]]:
    """shard file name -> the tensor names the index puts in it. Shards must be plain file names of the
    index's own kind: an index must not lead outside its folder, nor a safetensors index to a pickle."""
    weight_map = (read_json(index) or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        raise GeometryError(f"{index}: no weight_map")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard.endswith(f".{kind}") and Path(shard).name == shard):
            raise GeometryError(f"{index}: tensor {name!r} is mapped to {str(shard)[:80]!r}, not a .{kind} file "
                                "in the same folder")
        shards.setdefault(shard, []).append(name)
    return shards


def weight_files(d: Path, allow_pickle: bool) -> list[tuple[Path, list[str] | None]] | None:
    """The weight files of a model dir, each with the tensor names its index assigns it (None: all
    it holds); None when the dir holds no weights. safetensors wins, so a dir with both is never unpickled.
    """
    for kind, single in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        index = d / f"{single}.index.json"
        files = _plain_files(d, kind)
        if not (index.is_file() or files):
            continue
        if kind == "bin" and not allow_pickle:
            raise GeometryError(f"{d}: only pickle weights (*.bin) found; {PICKLE_REFUSED}")
        if not index.is_file():
            return [(d / single, None)] if (d / single).is_file() else [(f, None) for f in files]
        shards = _shards(index, kind)
        for shard in sorted(shards):
            problem = stat_problem(d / shard)
            if problem or not (d / shard).is_file():
                raise GeometryError(f"{index}: names shard {shard}, which is {problem or 'not a file'} in {d}")
        return [(d / shard, names) for shard, names in sorted(shards.items())]
    return None


def ignored_pickles(d: Path, found: list[tuple[Path, list[str] | None]]) -> list[str]:
    """A note when a folder holds safetensors and pickle weights both: the safetensors were read."""
    if not d.is_dir() or any(p.suffix != ".safetensors" for p, _ in found):
        return []
    pickles = sorted(f.name for f in d.glob("*.bin") if f.name != "training_args.bin")
    return [f"{d}: read its safetensors weights, ignored {', '.join(pickles)}"] if pickles else []
