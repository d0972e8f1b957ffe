"""Every input a new user tries (issue 10), through `geometry analyze` in-process (main, as the console
script calls it): a base against plain fine-tune folders or files, a list of differently named fine-tunes,
a Hugging Face cache snapshot and a hub name in the local cache; then hostile and broken files, outputs
that cannot be written, and a disk that fills up, each of which must end in one line, exit code 2 and no
output left behind. Interrupts and the real console process are in test_interrupts.py."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from st_bytes import DOWN, UP, join, split, tiny, to_bytes

from geometry.cli import main
from geometry.offline.outputs import FILES, PAIRS
from geometry.table import Table

ROOT = Path(__file__).parent.parent
BASE = tiny(0)


def _model(d: Path, tensors: dict | bytes, name: str = "model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(tensors if isinstance(tensors, bytes) else to_bytes(tensors))
    return d


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A folder with base/ and three fine-tunes named like real ones; the hub is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _model(tmp_path / "base", BASE)
    for i, name in enumerate(("phi-2", "phi-2-instruct", "chat"), start=1):
        _model(tmp_path / name, tiny(i, 1e-2 * i, BASE))
    return tmp_path


def _analyze(capsys, *argv):
    code = main(["analyze", *map(str, argv), "--no-progress", "--no-figures"])  # tables are what these test
    _, err = capsys.readouterr()
    return code, err


def _ok(capsys, out: Path, *argv, pairs: bool = False) -> tuple[dict, Table]:
    """The analysis's tables, and pairs.csv exactly where runs share a base (``pairs``)."""
    code, err = _analyze(capsys, *argv, "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted((*FILES, PAIRS) if pairs else FILES)
    return json.loads((out / "summary.json").read_text()), Table.from_csv(out / "metrics.csv")


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp")]


def _refused(capsys, root: Path, *argv, match: str, out: Path | None = None) -> str:
    out = out or root / "out-refused"
    existed = out.exists()
    code, err = _analyze(capsys, *argv, "-o", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("geometry: error: "), err
    assert match in lines[0], lines[0]
    assert out.exists() == existed and not _leftovers(root), "a refused analysis leaves nothing behind"
    return lines[0]


# ---- plain inputs ----------------------------------------------------------------------------

def test_base_against_one_plain_fine_tune_folder(tmp, capsys):
    """The first command anyone runs; `phi-2` is a name, not step 2."""
    summary, table = _ok(capsys, tmp / "out", tmp / "base", tmp / "phi-2")
    run = summary["runs"]["run"]
    assert run["steps"] == [1] and run["step_labels"] == ["phi-2"] and run["base"] == "base"
    assert table.unique("step") == [1] and set(table.unique("matrix")) == {UP, DOWN}
    assert table.where(metric="locking_onset_frac").unique("step") == [1]


def test_base_against_differently_named_fine_tunes_in_the_order_given(tmp, capsys):
    summary, table = _ok(capsys, tmp / "out", tmp / "base", tmp / "chat", tmp / "phi-2", tmp / "phi-2-instruct")
    run = summary["runs"]["run"]
    assert run["steps"] == [1, 2, 3] and run["step_labels"] == ["chat", "phi-2", "phi-2-instruct"]
    # each step measures its own fine-tune: the update norm grows with the noise each was made with (3, 1, 2)
    fro = [sum(r.value for r in table.where(step=s, metric="fro_norm")) for s in (1, 2, 3)]
    assert fro[1] < fro[2] < fro[0]


def test_bare_files_and_labelled_runs(tmp, capsys):
    for name in ("base", "phi-2", "chat"):
        shutil.copy(tmp / name / "model.safetensors", tmp / f"{name}.safetensors")
    summary, _ = _ok(capsys, tmp / "out", tmp / "base.safetensors", tmp / "phi-2.safetensors")
    assert summary["runs"]["run"]["step_labels"] == ["phi-2"]
    summary, table = _ok(capsys, tmp / "out2", "--run", "a", tmp / "base.safetensors", tmp / "chat.safetensors",
                         "--run", "b", tmp / "base", tmp / "phi-2", tmp / "chat", pairs=True)  # one base, copied
    assert table.unique("run") == ["a", "b"]
    assert summary["runs"]["a"]["step_labels"] == ["chat"] and summary["runs"]["b"]["steps"] == [1, 2]


def test_same_names_in_different_folders_are_told_apart_by_path(tmp, capsys):
    for d, src in (("x/final", "phi-2"), ("y/final", "chat")):
        shutil.copytree(tmp / src, tmp / d)
    summary, _ = _ok(capsys, tmp / "out", tmp / "base", tmp / "x/final", tmp / "y/final")
    assert summary["runs"]["run"]["step_labels"] == [str(tmp / "x/final"), str(tmp / "y/final")]


def test_numbered_and_unnumbered_checkpoints_are_not_mixed(tmp, capsys):
    shutil.copytree(tmp / "phi-2", tmp / "run" / "checkpoint-10")
    _refused(capsys, tmp, tmp / "base", tmp / "run", tmp / "chat", match="no step")


def _hf_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """huggingface_hub's cache layout: blobs/ by content, snapshots/<commit>/ of symlinks, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        (root / "blobs" / f"blob{i}").write_bytes(data)
        os.symlink(f"../../blobs/blob{i}", snap / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snap


def test_hf_cache_snapshot_folder_and_hub_names(tmp, capsys, monkeypatch):
    """A snapshot folder is read through its symlinks into blobs/; `org/model` resolves in the cache (offline)."""
    cache = tmp / "hf"
    base = _hf_cache(cache, "acme/tiny", {"model.safetensors": to_bytes(BASE), "config.json": b"{}"})
    _hf_cache(cache, "acme/tiny-instruct", {"model.safetensors": to_bytes(tiny(5, 1e-2, BASE))})
    summary, _ = _ok(capsys, tmp / "out", base, tmp / "phi-2")
    assert summary["runs"]["run"]["base"] == "acme/tiny"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    summary, table = _ok(capsys, tmp / "out2", "acme/tiny", "acme/tiny-instruct")
    assert summary["runs"]["run"]["base"] == "acme/tiny"
    assert summary["runs"]["run"]["step_labels"] == ["acme/tiny-instruct"] and table.unique("step") == [1]
    _refused(capsys, tmp, "acme/tiny", "acme/absent", match="acme/absent: not a local path, and not in the "
             "Hugging Face cache")
    monkeypatch.chdir(tmp)  # a relative path under an existing folder is a typo, not a hub name
    _refused(capsys, tmp, "acme/tiny", "phi-2/absent", match="phi-2/absent: no such file or directory")


def test_safetensors_win_over_pickles_and_say_so(tmp, capsys):
    torch.save({UP: torch.zeros(12, 8)}, tmp / "phi-2" / "pytorch_model.bin")  # would read as a huge update
    code, err = _analyze(capsys, tmp / "base", tmp / "phi-2", "-o", tmp / "out")
    assert code == 0 and "read its safetensors weights, ignored pytorch_model.bin" in err
    fro = Table.from_csv(tmp / "out" / "metrics.csv").where(matrix=UP, metric="fro_norm")
    want = float(torch.linalg.norm(tiny(1, 1e-2, BASE)[UP] - BASE[UP]))
    assert [r.value for r in fro] == pytest.approx([want], rel=1e-5)


def test_int8_tensor_that_is_not_selected_and_a_hand_edited_config(tmp, capsys):
    """Quantization scales beside float weights are not measured, so they are no reason to refuse."""
    scales = {"model.layers.0.mlp.up_proj.scales": torch.ones(12, 1, dtype=torch.int8)}
    for d in ("base", "chat"):
        (tmp / d / "config.json").write_text(json.dumps({"num_attention_heads": "4", "intermediate_size": [1]}))
    _model(tmp / "base", BASE | scales)
    _model(tmp / "chat", tiny(3, 1e-2, BASE) | scales)
    _, table = _ok(capsys, tmp / "out", tmp / "base", tmp / "chat")
    assert set(table.unique("matrix")) == {UP, DOWN}


# ---- hostile and broken files: one line, exit 2, nothing left ---------------------------------------

GOOD = to_bytes(tiny(1, 1e-2, BASE))
HEADER, BODY = split(GOOD)


def _edit(**entries) -> bytes:
    """GOOD with some header entries replaced (None: removed)."""
    h = {k: dict(v) if isinstance(v, dict) else v for k, v in HEADER.items()}
    for name, change in entries.items():
        name = {"up": UP, "down": DOWN}.get(name, name)
        if change is None:
            h.pop(name)
        else:
            h[name] = {**h.get(name, {}), **change}
    return join(h, BODY)


BROKEN_FILES = {
    "absurd header length": ((1 << 63).to_bytes(8, "little") + GOOD[8:], "exceeds the limit"),
    "17 MiB header": (join(b"{" + b" " * (17 << 20) + b"}", b""), "exceeds the limit"),
    "header length past the end": (len(GOOD).to_bytes(8, "little") + GOOD[8:], "bytes after it"),
    "shorter than 8 bytes": (b"\x05\x00", "shorter than the 8-byte"),
    "empty file": (b"", "shorter than the 8-byte"),
    "header not JSON": (join(b"{\"a\": ", BODY), "not a readable safetensors file"),
    "header not UTF-8": (join(b"{\"\xff\": 1}", BODY), "not UTF-8"),
    "header nested 100000 deep": (join(b"[" * 100_000 + b"]" * 100_000, b""), "nested too deeply"),
    "header not an object": (join(b"[1, 2]", BODY), "not a JSON object"),
    "duplicate tensor name": (join(json.dumps(HEADER)[:-1].encode() + b", " + json.dumps({UP: HEADER[UP]})[1:].encode(),
                                   BODY), "duplicate key"),
    "overlapping data offsets": (_edit(up={"data_offsets": [0, 384]}, down={"data_offsets": [0, 384]}), "overlaps"),
    "data offsets out of range": (_edit(down={"data_offsets": [10**20, 10**20 + 384]}), "past the"),
    "data cut short": (GOOD[:-100], "past the"),
    "gap in the data": (_edit(up={"data_offsets": [4, 388]}, down={"data_offsets": [388, 772]})[:-768]
                        + b"\0" * 4 + BODY, "a gap of 4 bytes"),
    "offsets reversed": (_edit(up={"data_offsets": [384, 0]}), "0 <= begin <= end"),
    "span does not match shape x dtype": (_edit(up={"shape": [12, 9]}), "needs"),
    "negative dimension": (_edit(up={"shape": [-12, -8]}), "non-negative"),
    "dimension not an integer": (_edit(up={"shape": [12.0, 8]}), "non-negative integers"),
    "unknown dtype": (_edit(up={"dtype": "Q4_K"}), "unknown dtype"),
    "entry without offsets": (join({**HEADER, UP: {"dtype": "F32", "shape": [12, 8]}}, BODY), "lacks dtype, shape"),
    "metadata not strings": (_edit(__metadata__={"format": 1}), "__metadata__"),
    "int8 matrix": (to_bytes({k: v.to(torch.int8) for k, v in BASE.items()}), "is int8; only float16"),
    "float8 matrix": (to_bytes({k: v.to(torch.float8_e4m3fn) for k, v in BASE.items()}), "is float8_e4m3fn"),
    "bool matrix": (to_bytes({k: v > 0 for k, v in BASE.items()}), "is bool"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_safetensors_file(tmp, capsys, case):
    data, match = BROKEN_FILES[case]
    _model(tmp / "bad", data)
    line = _refused(capsys, tmp, tmp / "base", tmp / "bad", match=match)
    assert "bad" in line


def _sharded(d: Path, shards: dict[str, dict], weight_map: dict | str | None) -> Path:
    d.mkdir(parents=True)
    for name, tensors in shards.items():
        save_file(tensors, str(d / name))
    if weight_map is not None:
        text = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
        (d / "model.safetensors.index.json").write_text(text)
    return d


FT = tiny(1, 1e-2, BASE)
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
BROKEN_SHARDS = {
    "index names a missing shard": ({S1: {UP: FT[UP]}}, {UP: S1, DOWN: S2}, f"names shard {S2}"),
    "shard lacks a tensor the index puts in it": ({S1: {UP: FT[UP]}, S2: {"x": FT[UP]}}, {UP: S1, DOWN: S2},
                                                  "which lacks it"),
    "index points outside its folder": ({S1: {UP: FT[UP]}}, {UP: S1, DOWN: "../base/model.safetensors"},
                                        "not a .safetensors file in the same folder"),
    "safetensors index points to a pickle": ({S1: {UP: FT[UP]}}, {UP: S1, DOWN: "evil.bin"}, "evil.bin"),
    "index shard name not a string": ({S1: {UP: FT[UP]}}, {UP: S1, DOWN: 7}, "mapped to '7'"),
    "index without weight_map": ({S1: FT}, "{}", "no weight_map"),
    "index not JSON": ({S1: FT}, "{\"weight_map\": ", "not valid JSON"),
    "index not an object": ({S1: FT}, "[]", "expected a JSON object"),
    "shard disagrees with the base on a shape": ({S1: {UP: FT[UP]}, S2: {DOWN: torch.zeros(8, 10)}},
                                                 {UP: S1, DOWN: S2}, "has shape (8, 10), base has (8, 12)"),
    "two shards hold one tensor, shapes differ": ({S1: FT, S2: {UP: torch.zeros(3, 3)}}, None, "is in both"),
}


@pytest.mark.parametrize("case", list(BROKEN_SHARDS))
def test_broken_sharded_checkpoint(tmp, capsys, case):
    shards, weight_map, match = BROKEN_SHARDS[case]
    _sharded(tmp / "bad", shards, weight_map)
    _refused(capsys, tmp, tmp / "base", tmp / "bad", match=match)


def test_symlink_loops_and_dangling_links(tmp, capsys):
    os.symlink("loop", tmp / "loop")
    _refused(capsys, tmp, tmp / "base", tmp / "loop", match="loop: a symlink loop")
    (tmp / "inner").mkdir()
    os.symlink("model.safetensors", tmp / "inner" / "model.safetensors")
    _refused(capsys, tmp, tmp / "base", tmp / "inner", match="model.safetensors: a symlink loop")
    (tmp / "download").mkdir()  # an HF snapshot whose blob never arrived
    os.symlink("../../blobs/0a1b", tmp / "download" / "model.safetensors")
    _refused(capsys, tmp, tmp / "base", tmp / "download", match="which does not exist")
    (tmp / "run").mkdir()  # a run dir whose checkpoint-N points back up
    os.symlink("..", tmp / "run" / "checkpoint-5")
    _refused(capsys, tmp, tmp / "base", tmp / "run", match="no model weights")


# ---- outputs that cannot be written ------------------------------------------------------------

def test_output_path_is_a_file_or_under_one(tmp, capsys):
    (tmp / "taken").write_text("not a folder")
    _refused(capsys, tmp, tmp / "base", tmp / "phi-2", out=tmp / "taken", match="exists and is not a directory")
    assert (tmp / "taken").read_text() == "not a folder"
    _refused(capsys, tmp, tmp / "base", tmp / "phi-2", out=tmp / "taken" / "sub", match="is not a directory")


def test_existing_output_dir_is_updated_whole(tmp, capsys):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    _ok(capsys, tmp / "out2", tmp / "base", tmp / "phi-2")
    code, _ = _analyze(capsys, tmp / "base", tmp / "phi-2", "-o", tmp / "out")
    assert code == 0 and (tmp / "out" / "notes.txt").read_text() == "mine" and not _leftovers(tmp)
    assert (tmp / "out" / "metrics.csv").read_bytes() == (tmp / "out2" / "metrics.csv").read_bytes()


def _namespace() -> list[str] | None:
    """A command prefix giving a private mount namespace where a tmpfs can be mounted, or None."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        try:
            if subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"], capture_output=True,
                              timeout=20).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


NAMESPACE = _namespace()
needs_mounts = pytest.mark.skipif(NAMESPACE is None, reason="no private mount namespace (unshare refused): no real "
                                  "small or read-only file system to test with")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONDONTWRITEBYTECODE": "1"}


def _cli_in_tmpfs(tmp: Path, opts: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The real command writing into a fresh tmpfs mounted (with opts) at tmp/fs; what the fs held after."""
    fs = tmp / "fs"
    fs.mkdir()
    cmd = (f"mount -t tmpfs -o {opts} tmpfs {fs} && {{ {sys.executable} -m geometry analyze {tmp / 'base'} "
           f"{tmp / 'phi-2'} -o {fs / 'out'} --no-progress --no-figures; rc=$?; echo LEFT $(ls -A {fs}); "
           "exit $rc; }")
    proc = subprocess.run([*NAMESPACE, "sh", "-c", cmd], env=ENV, capture_output=True, text=True, timeout=120)
    left = [line for line in proc.stdout.splitlines() if line.startswith("LEFT")]
    return proc, left[0].split()[1:] if left else ["?"]


@needs_mounts
@pytest.mark.parametrize("opts, match", [("ro,size=64k", "Read-only file system"),
                                         ("size=8k", "No space left on device")])
def test_read_only_and_full_file_systems(tmp, opts, match):
    """8 KiB hold two pages: the probe passes, the third of four files fails mid-write."""
    proc, left = _cli_in_tmpfs(tmp, opts)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and match in lines[0], proc.stderr
    assert left == [], f"left on the file system: {left}"


def test_file_size_limit_mid_write(tmp):
    """RLIMIT_FSIZE, which needs no mounts: writes past 4 KiB fail with EFBIG (SIGXFSZ ignored)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp / "out"
    argv = [sys.executable, "-m", "geometry", "analyze", tmp / "base", tmp / "phi-2", "-o", out, "--no-progress",
            "--no-figures"]
    proc = subprocess.run(list(map(str, argv)), env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], proc.stderr
    assert not out.exists() and not _leftovers(tmp)
