"""A fuzzer (issue 10): valid safetensors files and shard indexes, mutated a few thousand times (bytes flipped,
spliced, truncated, header fields and the length prefix changed). Every case must end in a one-line
GeometryError or in a correct result, never in another exception, a hang or a crash.

Cases run in-process (analyze + write_analysis on two tiny matrices, outputs on a tmpfs where there is one),
seeded (derandomize) so that every run tries the same files; a handful also go through the real console
process. Each test prints how its cases ended (pytest -s shows it).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save_file
from st_bytes import DOWN, UP, join, split, tiny, to_bytes

from geometry.cli import error_line
from geometry.errors import GeometryError
from geometry.offline.analyze import analyze
from geometry.offline.header import DTYPE_BITS
from geometry.offline.outputs import FILES, write_analysis

ROOT = Path(__file__).parent.parent
N_FILES, N_INDEXES = 2000, 600
BASE = tiny(0) | {DOWN: tiny(0)[DOWN].bfloat16()}  # one float32 and one bfloat16 matrix
FT = {n: w.float() + 1e-2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) for n, w in BASE.items()}
FT = {n: w.to(BASE[n].dtype) for n, w in FT.items()}
GOOD = to_bytes(FT)
HEADER, BODY = split(GOOD)
HEADER_END = len(GOOD) - len(BODY)
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

# JSON values a header or an index field might be changed to: plausible, off by one, absurd, wrong type.
INTS = st.sampled_from([0, 1, 7, 8, 12, 96, 191, 192, 383, 384, 385, 576, 768, -1, 2**31, 2**63, 2**64, 10**30])
VALUES = st.one_of(INTS, st.sampled_from([*DTYPE_BITS, "", "F128", "f32", None, True, 1.5, "x"]),
                   st.lists(INTS, max_size=4), st.dictionaries(st.text(max_size=3), INTS, max_size=2))


def _outcome(err: GeometryError) -> str:
    """A refusal's class, from its message."""
    msg = error_line(err)  # as the CLI prints it
    assert "\n" not in msg and msg.strip(), repr(msg)
    for key, label in (("not a readable safetensors", "bad header"), ("shorter than", "bad header"),
                       ("NaN/Inf", "NaN/Inf"), ("can be measured", "unusable dtype"), ("cannot hold", "unusable dtype"),
                       ("missing", "tensor missing"), ("shape", "shape differs"), ("JSON", "bad index"),
                       ("weight_map", "bad index"), ("shard", "bad index"), ("lacks it", "bad index"),
                       ("in both", "bad index")):
        if key in msg:
            return f"refused: {label}"
    return f"refused: {msg[:60]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """base.safetensors on disk; outputs on a tmpfs when there is one (fsync there is free)."""
    d = tmp_path_factory.mktemp("fuzz")
    save_file(BASE, str(d / "base.safetensors"))
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else d))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield d, out
    torch.set_num_threads(torch_threads)
    shutil.rmtree(out, ignore_errors=True)


def _measure(work, ckpt: Path, expected) -> str:
    """Analyze base vs ckpt and write the outputs: 'correct' (checked against `expected()`, the tensors
    the file really holds) or the class of the one-line refusal. Any other exception fails the test."""
    d, out_root = work
    out = out_root / "out"
    try:
        analysis = analyze(d / "base.safetensors", [ckpt])
        write_analysis(analysis, out)
    except GeometryError as e:
        assert not out.exists()
        return _outcome(e)
    want = expected()
    for name in (UP, DOWN):
        [got] = [r.value for r in analysis.where(matrix=name, metric="fro_norm")]
        ref = float(torch.linalg.norm(want[name].double() - BASE[name].double()))
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), name
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    shutil.rmtree(out)
    return "correct result"


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    data = bytearray(GOOD)
    kind = draw(st.sampled_from(["flip anywhere", "flip in header", "flip in data", "truncate", "splice",
                                 "header field", "length prefix"]))
    if kind.startswith("flip"):
        start, end = {"flip anywhere": (0, len(data)), "flip in header": (0, HEADER_END),
                      "flip in data": (HEADER_END, len(data))}[kind]
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(start, end - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    elif kind == "header field":
        header = json.loads(json.dumps(HEADER))
        name = draw(st.sampled_from([UP, DOWN, "__metadata__", "extra"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole entry", "delete entry"]))
        if field == "delete entry":
            header.pop(name, None)
        elif field == "whole entry" or not isinstance(header.get(name), dict):
            header[name] = draw(VALUES)
        else:
            header[name][field] = draw(VALUES)
        data = bytearray(join(header, BODY))
    else:
        data[:8] = (draw(st.one_of(INTS, st.integers(0, 2**64 - 1))) % 2**64).to_bytes(8, "little")
    return kind, bytes(data)


def test_fuzzed_safetensors_files(work):
    tally: Counter = Counter()
    ckpt = work[0] / "ckpt" / "model.safetensors"
    ckpt.parent.mkdir()

    @settings(max_examples=N_FILES, **SETTINGS)
    @given(mutated_files())
    def one(case):
        kind, data = case
        ckpt.write_bytes(data)
        tally[(kind, _measure(work, ckpt.parent, lambda: load(data)))] += 1

    one()
    _report("safetensors files", tally)
    assert sum(tally.values()) >= N_FILES * 0.9  # hypothesis may drop a few duplicates; not many
    assert any(end == "correct result" for _, end in tally) and any(end != "correct result" for _, end in tally)


def _shard_dir(d: Path) -> Path:
    d.mkdir()
    save_file({UP: FT[UP]}, str(d / S1))
    save_file({DOWN: FT[DOWN]}, str(d / S2))
    return d


INDEX = json.dumps({"metadata": {"total_size": 576}, "weight_map": {UP: S1, DOWN: S2}}).encode()
SHARD_NAMES = st.sampled_from([S1, S2, "absent.safetensors", "../base.safetensors", "/etc/passwd", "x.bin",
                               "model.safetensors.index.json", "", "."])


@st.composite
def mutated_indexes(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["weight_map entry", "weight_map itself", "flip", "truncate"]))
    if kind in ("flip", "truncate"):
        data = bytearray(INDEX)
        if kind == "truncate":
            return kind, bytes(data[:draw(st.integers(0, len(data) - 1))])
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(data)
    doc = json.loads(INDEX)
    if kind == "weight_map itself":
        doc["weight_map"] = draw(st.one_of(VALUES, st.dictionaries(st.sampled_from([UP, DOWN, "x"]), SHARD_NAMES)))
    else:
        key = draw(st.sampled_from([UP, DOWN, "extra"]))
        doc["weight_map"][key] = draw(st.one_of(SHARD_NAMES, VALUES))
    return kind, json.dumps(doc).encode()


def test_fuzzed_shard_indexes(work):
    tally: Counter = Counter()
    shards = _shard_dir(work[0] / "sharded")

    @settings(max_examples=N_INDEXES, **SETTINGS)
    @given(mutated_indexes())
    def one(case):
        kind, data = case
        (shards / "model.safetensors.index.json").write_bytes(data)
        tally[(kind, _measure(work, shards, lambda: FT))] += 1

    one()
    _report("shard indexes", tally)
    assert sum(tally.values()) >= N_INDEXES * 0.9
    assert any(end == "correct result" for _, end in tally) and any(end != "correct result" for _, end in tally)


def _report(what: str, tally: Counter) -> None:
    print(f"\nfuzzed {what}: {sum(tally.values())} cases")
    for (kind, end), n in sorted(tally.items()):
        print(f"  {kind:18s} -> {end}: {n}")


CLI_CASES = {  # through the real console process, in parallel (each pays for importing torch)
    "absurd length": (1 << 62).to_bytes(8, "little") + GOOD[8:],
    "offsets overlap": join({**HEADER, UP: {**HEADER[UP], "data_offsets": HEADER[DOWN]["data_offsets"]}}, BODY),
    "data byte flipped": GOOD[:-5] + bytes([GOOD[-5] ^ 1]) + GOOD[-4:],
}


def test_a_handful_through_the_real_cli(work):
    d = work[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {}
    for i, (case, data) in enumerate(CLI_CASES.items()):
        (d / f"cli{i}").mkdir()
        (d / f"cli{i}" / "model.safetensors").write_bytes(data)
        argv = [sys.executable, "-m", "geometry", "analyze", d / "base.safetensors", d / f"cli{i}", "-o",
                d / f"cli-out{i}", "--no-progress", "--no-figures"]
        procs[case] = (i, subprocess.Popen(list(map(str, argv)), env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))
    ends = {}
    for case, (i, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, err
        if proc.returncode == 2:
            assert len(err.strip().splitlines()) == 1 and not (d / f"cli-out{i}").exists(), err
        else:
            assert proc.returncode == 0 and (d / f"cli-out{i}" / "metrics.csv").is_file(), err
        ends[case] = proc.returncode
    assert ends == {"absurd length": 2, "offsets overlap": 2, "data byte flipped": 0}
