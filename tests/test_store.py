"""The geometry store: layout, atomic writes, resume, refusals, writer errors, a SIGKILL mid-write, and
manifests edited by hand (refused with one line by every reader, not half-read)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from geometry.capture.layout import check_free_space
from geometry.capture.manifest import Manifest, TensorInfo
from geometry.capture.store import (
    MANIFEST,
    Store,
    base_hash,
    check_store,
    iter_tracking,
    read_manifest,
    read_snapshot,
    read_tracking,
)
from geometry.capture.tracking import Estimate
from geometry.errors import GeometryError
from geometry.offline.sources import open_run

SETTINGS = {"snapshot_every": 5, "k": 4}


def base_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj.weight": torch.randn(12, 8, generator=g).bfloat16(),
            "layers.0.up_proj.weight": torch.randn(20, 8, generator=g)}


def tracked(m, n, k=4, step=1):
    g = torch.Generator().manual_seed(step)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return Estimate(u, torch.linspace(2, 1, k), v, float(step), 1, 1e-3, False)


def records(step):
    return {"layers.0.q_proj.weight": tracked(12, 8, step=step), "layers.0.up_proj.weight": tracked(20, 8, step=step)}


def write_steps(store, steps, snapshot_every=5):
    for t in steps:
        if t % snapshot_every == 0:
            store.put_snapshot(t, {n: x + t for n, x in base_tensors().items()})
        store.put_tracking(t, records(t))


def test_layout_manifest_and_round_trip(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS, label="qwen-base", config={"model_type": "llama"})
    assert store.last_step is None
    write_steps(store, range(1, 11))
    store.close(final_step=10)

    man = read_manifest(run)
    assert man.base_label == "qwen-base" and man.base_sha256 == base_hash(base_tensors())
    assert man.steps == [5, 10] and man.tracking_steps == list(range(1, 11)) and man.final_step == 10
    assert man.settings == SETTINGS
    assert [t.name for t in man.tensors] == sorted(base_tensors())
    assert {t.dtype for t in man.tensors} == {"bfloat16", "float32"}
    assert [t.shape for t in man.tensors] == [(12, 8), (20, 8)]
    assert check_store(run) == man
    assert sorted(p.name for p in run.iterdir()) == ["base", "checkpoint-10", "checkpoint-5", MANIFEST, "tracking"]
    assert json.loads((run / "base" / "config.json").read_text()) == {"model_type": "llama"}

    for name, x in base_tensors().items():  # stored dtype preserved, bit for bit
        assert torch.equal(read_snapshot(run, None)[name], x)
        assert read_snapshot(run, 5)[name].dtype == x.dtype and torch.equal(read_snapshot(run, 5)[name], x + 5)
    got = read_tracking(run, 3)["layers.0.up_proj.weight"]
    want = tracked(20, 8, step=3)
    assert got.fro == 3.0 and got.iters == 1 and not got.exact and got.residual == pytest.approx(1e-3)
    assert torch.allclose(got.u, want.u, atol=1e-3) and torch.equal(got.s, want.s)
    # the generic checkpoint reader sees a Trainer-style run
    assert [c.step for c in open_run(run)] == [5, 10]


def test_tracking_files_stack_same_shapes_and_version_1_files_still_read(tmp_path):
    """A tracking file holds four tensors per shape (three matrices here, two of one shape), and
    read_tracking gives each matrix its own rows; a version-1 file (four tensors per matrix) reads the same."""
    names = ["layers.0.q_proj.weight", "layers.0.k_proj.weight", "layers.0.up_proj.weight"]
    base = {n: torch.randn(20 if "up" in n else 12, 8) for n in names}
    recs = {names[0]: tracked(12, 8, step=1), names[1]: tracked(12, 8, step=2), names[2]: tracked(20, 8, step=3)}
    store = Store.open(tmp_path / "run", base, settings=SETTINGS)
    store.put_tracking(1, recs, torch.float32)
    store.close(final_step=1)
    with safe_open(str(tmp_path / "run" / "tracking" / "1.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{g}:{p}" for g in (0, 1) for p in ("stats", "s", "u", "v"))
    legacy = tmp_path / "v1"
    (legacy / "tracking").mkdir(parents=True)
    save_file({f"{n}:{part}": x for n, r in recs.items() for part, x in
               (("stats", torch.tensor([r.fro, r.iters, r.residual, float(r.exact)], dtype=torch.float64)),
                ("s", r.s), ("u", r.u.contiguous()), ("v", r.v.contiguous()))}, legacy / "tracking" / "1.safetensors")
    for run in (tmp_path / "run", legacy):
        got = read_tracking(run, 1)
        assert sorted(got) == sorted(names)
        for n, want in recs.items():
            assert got[n].fro == want.fro and got[n].iters == want.iters and got[n].exact == want.exact
            assert torch.equal(got[n].s, want.s) and torch.equal(got[n].u, want.u) and torch.equal(got[n].v, want.v)


def test_flush_waits_for_every_queued_write(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    write_steps(store, range(1, 8))
    store.flush()  # what a training loop calls before saving its own checkpoint
    man = read_manifest(run)
    assert man.steps == [5] and man.tracking_steps == list(range(1, 8)) and man.final_step is None
    store.close()
    store.flush()  # a no-op once closed


def closed_store(tmp_path):
    """A store with steps 1..5 written and closed."""
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    write_steps(store, range(1, 6))
    store.close()
    return run


def test_tmp_leftovers_are_ignored_then_cleaned(tmp_path):
    run = closed_store(tmp_path)
    # a crash mid-write leaves these behind
    (run / ".tmp-checkpoint-10").mkdir()
    (run / ".tmp-checkpoint-10" / "model.safetensors").write_bytes(b"half a file")
    (run / "tracking" / ".tmp-6.safetensors").write_bytes(b"half")
    (run / f".tmp-{MANIFEST}").write_text("{not json")
    assert [c.step for c in open_run(run)] == [5]  # readers ignore .tmp*
    assert read_manifest(run).tracking_steps == [1, 2, 3, 4, 5]
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    store.close()
    assert not [p for p in [*run.iterdir(), *(run / "tracking").iterdir()] if p.name.startswith(".tmp")]


def test_data_without_manifest_entry_is_removed_on_reopen(tmp_path):
    """A crash between a snapshot landing and its manifest update, or a broken tracking file: removed."""
    run = closed_store(tmp_path)
    (run / "checkpoint-7").mkdir()
    (run / "checkpoint-7" / "model.safetensors").write_bytes(b"x")
    (run / "tracking" / "6.safetensors").write_bytes(b"x")
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    assert store.last_step == 5
    assert not (run / "checkpoint-7").exists() and not (run / "tracking" / "6.safetensors").exists()
    write_steps(store, [6, 7], snapshot_every=7)  # rewriting those steps works
    store.close()
    assert read_manifest(run).steps == [5, 7]


def _estimates_equal(a, b):
    return sorted(a) == sorted(b) and all(
        a[n].fro == b[n].fro and torch.equal(a[n].s, b[n].s) and torch.equal(a[n].u, b[n].u)
        and torch.equal(a[n].v, b[n].v) for n in a)


def test_chunks_hold_the_same_estimates_as_step_files(tmp_path):
    """Version 3: 23 steps in chunks of 5 (steps 1-20 in four chunk files, 21-23 in their own) read back
    exactly as the same steps written a file per step; every reader finds them (read_tracking without and
    with the chunk, iter_tracking, the tracking table); a resumed store goes on merging after its last chunk."""
    from geometry.capture.trajectory import tracking_table

    chunked, plain = tmp_path / "chunked", tmp_path / "plain"
    for run, chunk in ((chunked, 5), (plain, 0)):
        store = Store.open(run, base_tensors(), settings=SETTINGS, chunk_steps=chunk)
        write_steps(store, range(1, 24))
        store.close()
    man = read_manifest(chunked)
    assert man.version == 3 and man.tracking_chunks == [(1, 5), (6, 10), (11, 15), (16, 20)]
    assert json.loads((chunked / MANIFEST).read_text())["tracking_steps"] == [[1, 23, 1]]  # a run, not 23 numbers
    assert man.loose_steps() == [21, 22, 23] and man.chunk_of(7) == (6, 10) and man.chunk_of(22) is None
    assert len(list((chunked / "tracking").iterdir())) == 7 and check_store(chunked) == man
    assert read_manifest(plain).tracking_chunks == [] and len(list((plain / "tracking").iterdir())) == 23
    for t in range(1, 24):
        want = read_tracking(plain, t)
        assert _estimates_equal(read_tracking(chunked, t), want)
        assert _estimates_equal(read_tracking(chunked, t, man.chunk_of(t)), want)
    assert [t for t, _ in iter_tracking(chunked, man)] == list(range(1, 24))
    a, b = tracking_table(chunked, run="x").rows, tracking_table(plain, run="x").rows
    assert len(a) == len(b) == 23 * 2 * 7 and all(
        x[:6] == y[:6] and (x[6] == y[6] or (x[6] != x[6] and y[6] != y[6])) for x, y in zip(a, b, strict=True))
    store = Store.open(chunked, base_tensors(), settings=SETTINGS, chunk_steps=5)
    write_steps(store, range(24, 28))
    store.close()
    assert read_manifest(chunked).tracking_chunks[-1] == (21, 25)


def test_chunk_crash_states_are_repaired_on_reopen(tmp_path):
    """A kill between a chunk's rename and the manifest listing it leaves an unlisted chunk (its step files are
    still there): deleted. A kill after the manifest, before the step files go, leaves step files inside a
    listed chunk: deleted. Either way every step is read back once, unchanged."""
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS, chunk_steps=4)
    write_steps(store, range(1, 11))  # chunks 1-4, 5-8; steps 9 and 10 in their own files
    store.close()
    want = {t: read_tracking(run, t) for t in range(1, 11)}
    tracking = run / "tracking"
    shutil.copy(tracking / "chunk-5-8.safetensors", tracking / "chunk-9-10.safetensors")  # landed, never listed
    save_file({"x": torch.zeros(1)}, tracking / "6.safetensors")  # merged into 5-8, not yet deleted
    store = Store.open(run, base_tensors(), settings=SETTINGS, chunk_steps=4)
    assert store.last_step == 10
    store.close()
    assert sorted(p.name for p in tracking.iterdir()) == ["10.safetensors", "9.safetensors",
                                                          "chunk-1-4.safetensors", "chunk-5-8.safetensors"]
    assert all(_estimates_equal(read_tracking(run, t), want[t]) for t in want)


def test_a_version_2_store_resumed_stays_one_file_per_step(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS, chunk_steps=0)
    write_steps(store, range(1, 4))
    store.close()
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["version"] = 2
    del manifest["tracking_chunks"]
    manifest["tracking_steps"] = [1, 2, 3]  # version 2 lists every step
    (run / MANIFEST).write_text(json.dumps(manifest))
    store = Store.open(run, base_tensors(), settings=SETTINGS, chunk_steps=2)
    write_steps(store, range(4, 9))
    store.close()
    man = read_manifest(run)
    assert man.version == 2 and not man.tracking_chunks and len(list((run / "tracking").iterdir())) == 8
    assert "tracking_chunks" not in json.loads((run / MANIFEST).read_text())


LANDED = textwrap.dedent("""
    import os, sys, time
    from geometry.capture.store import Store, read_manifest
    sys.path.insert(0, {tests!r})
    from test_store import base_tensors, write_steps, SETTINGS
    store = Store.open({run!r}, base_tensors(), settings=SETTINGS, commit_seconds=3600.0)
    write_steps(store, [1, 2])
    store.flush()  # flush writes the manifest
    print(read_manifest({run!r}).tracking_steps, flush=True)
    write_steps(store, [3, 4])
    while not os.path.exists(os.path.join({run!r}, "tracking", "4.safetensors")):
        time.sleep(0.01)
    print(read_manifest({run!r}).tracking_steps, flush=True)
    os._exit(0)  # the training process dies here: its store never closes, nothing runs at exit
""")


def test_landed_tracking_files_wait_for_the_manifest_and_are_taken_in_on_reopen(tmp_path):
    """Tracking files land every step; the manifest lists them at most every commit_seconds (its rewrite costs
    O(steps)), and at snapshots, flush and close. A crash in between loses nothing: reopening takes them in."""
    run = tmp_path / "run"
    code = LANDED.format(tests=str(Path(__file__).parent), run=str(run))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[1, 2]", "[1, 2]"]  # 3 and 4 landed, not yet listed
    assert read_manifest(run).tracking_steps == [1, 2]
    again = Store.open(run, base_tensors(), settings=SETTINGS)
    assert again.last_step == 4 and read_manifest(run).tracking_steps == [1, 2, 3, 4]
    assert read_tracking(run, 4)["layers.0.q_proj.weight"].fro == 4.0
    write_steps(again, [5])  # a snapshot step: the manifest is written at once
    deadline = time.monotonic() + 30
    while read_manifest(run).steps != [5] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read_manifest(run).steps == [5]
    again.close()
    assert read_manifest(run).tracking_steps == [1, 2, 3, 4, 5]


def test_manifest_is_always_valid_json_during_writes(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS, queue_size=4)
    seen, bad, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                text = (run / MANIFEST).read_text()
                json.loads(text)
            except json.JSONDecodeError as e:
                bad.append(e)
                continue
            for t in Manifest.from_json(text).tracking_steps:  # everything it lists is complete and readable
                if t not in seen:
                    read_tracking(run, t)
                    seen.add(t)

    th = threading.Thread(target=reader)
    th.start()
    write_steps(store, range(1, 41))
    store.close()
    stop.set()
    th.join()
    assert not bad and len(seen) > 0


def test_resume_returns_last_complete_step(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    write_steps(store, range(1, 13))
    store.close()  # no final step: the run was interrupted
    assert read_manifest(run).final_step is None
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    assert store.last_step == 12
    write_steps(store, range(13, 21))
    store.close(final_step=20)
    man = read_manifest(run)
    assert man.tracking_steps == list(range(1, 21)) and man.steps == [5, 10, 15, 20]
    # a run resumed mid-way passes no base: the store's own is used (and checked against the manifest)
    store = Store.open(run, None, settings=SETTINGS)
    assert store.last_step == 20 and base_hash(store.base()) == man.base_sha256
    store.close()


def test_other_base_is_refused(tmp_path):
    run = tmp_path / "run"
    Store.open(run, base_tensors(), settings=SETTINGS).close()
    other = base_tensors()
    other["layers.0.up_proj.weight"][0, 0] += 1
    with pytest.raises(GeometryError, match=r"store .* was made from another base \(sha256"):
        Store.open(run, other, settings=SETTINGS)
    with pytest.raises(GeometryError, match="other settings"):
        Store.open(run, base_tensors(), settings={**SETTINGS, "k": 8})


def test_bad_folders_are_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(GeometryError, match="cannot write the geometry store"):
        Store.open(blocker / "run", base_tensors(), settings=SETTINGS)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(GeometryError, match="not empty and not a geometry store"):
        Store.open(busy, base_tensors(), settings=SETTINGS)
    with pytest.raises(GeometryError, match="no geometry store to resume"):
        Store.open(tmp_path / "new", None, settings=SETTINGS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(GeometryError, match="cannot write"):
            Store.open(ro, base_tensors(), settings=SETTINGS)
    finally:
        ro.chmod(0o700)


def test_free_space_check(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(GeometryError, match="not enough disk space"):
        check_free_space(tmp_path, 2 * free)
    with pytest.warns(UserWarning, match="snapshots of"):
        check_free_space(tmp_path, free // 3)
    check_free_space(tmp_path, 1024)


def test_writer_errors_reach_the_training_thread(tmp_path):
    run = tmp_path / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    (run / "tracking").rmdir()
    (run / "tracking").write_text("not a folder")  # every tracking write now fails in the writer
    store.put_tracking(1, records(1))
    with pytest.raises(GeometryError, match="tracking of step 1 failed"):
        store.close()

    run2 = tmp_path / "run2"
    store = Store.open(run2, base_tensors(), settings=SETTINGS, on_error="warn")
    (run2 / "tracking").rmdir()
    (run2 / "tracking").write_text("x")
    with pytest.warns(UserWarning, match="tracking of step 1 failed"):  # at the next call or at close
        store.put_tracking(1, records(1))
        store.put_snapshot(5, base_tensors())  # later writes still happen
        store.close()
    assert read_manifest(run2).steps == [5]


CHILD = textwrap.dedent("""
    import sys, torch
    from geometry.capture.store import Store
    sys.path.insert(0, {tests!r})
    from test_store import base_tensors, records, SETTINGS
    store = Store.open({run!r}, base_tensors(), settings=SETTINGS, queue_size=2, chunk_steps={chunk})
    t = 0
    while True:
        t += 1
        if t % 5 == 0:
            store.put_snapshot(t, {{n: x.repeat(40, 40) * 0 + t for n, x in base_tensors().items()}})
        store.put_tracking(t, records(t))
        if t == 3:
            print("started", flush=True)
""")


@pytest.mark.parametrize("chunk", [0, 7])
def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path, chunk):
    """chunk 0: a file per step; 7: step files merged into chunks of 7 while the child writes (version 3)."""
    run = tmp_path / "run"
    code = CHILD.format(tests=str(Path(__file__).parent), run=str(run), chunk=chunk)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent)
    assert child.stdout.readline().strip() == "started"
    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    man = read_manifest(run)  # valid JSON
    assert len(man.tracking_steps) > 3
    for t in man.tracking_steps:  # all it lists is complete
        assert read_tracking(run, t)["layers.0.q_proj.weight"].fro == float(t)
    for t in man.steps:
        assert torch.all(read_snapshot(run, t)["layers.0.up_proj.weight"] == t)
    assert bool(man.tracking_chunks) == bool(chunk)
    landed = sorted({int(p.stem) for p in (run / "tracking").glob("[0-9]*.safetensors")} | set(man.tracking_steps))
    store = Store.open(run, base_tensors(), settings=SETTINGS)
    # reopening takes in the tracking files that landed after the manifest's last rewrite: none is lost
    # (SETTINGS has no track_every, so a landed snapshot counts as a step too)
    assert store.last_step == max(landed + man.steps) >= max(man.tracking_steps + man.steps)
    store.close()
    again = read_manifest(run)
    assert again.tracking_steps == list(range(1, landed[-1] + 1))  # no hole
    assert again.tracking_chunks == man.tracking_chunks  # an unlisted chunk was dropped, its step files kept
    files = sorted(p.name for p in (run / "tracking").iterdir())
    assert files == sorted([f"chunk-{a}-{b}.safetensors" for a, b in again.tracking_chunks]
                           + [f"{t}.safetensors" for t in again.loose_steps()])
    for t in again.tracking_steps[len(man.tracking_steps):]:
        assert read_tracking(run, t)["layers.0.q_proj.weight"].fro == float(t)
    assert again.steps == man.steps
    names = [p.name for p in run.iterdir()] + [p.name for p in (run / "tracking").iterdir()]
    assert not [n for n in names if n.startswith(".tmp")]


# ---- manifests edited by hand (issue 10 item 5): one clear line from every reader, nothing half-read ----

def _set(key, value):
    return lambda d: d.update({key: value})


def _set_base(key, value):
    return lambda d: d["base"].update({key: value})


def _set_tensor(key, value):
    return lambda d: d["tensors"][0].update({key: value})


def _drop(*keys):
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


HOSTILE = {  # case: (edit of the manifest's JSON, what the one line says)
    "wrong base hash": (_set_base("sha256", "0" * 64), r"has a base/ other than the one its manifest names"),
    "steps out of order": (_set("steps", [10, 5]), r"steps are not in ascending order \(10 then 5\)"),
    "step listed twice": (_set("steps", [5, 5, 10]), r"steps lists step 5 twice"),
    "tracking steps out of order": (_set("tracking_steps", [1, 3, 2]), r"tracking_steps are not in ascending order"),
    "listed snapshot missing": (_set("steps", [5, 10, 15]),
                                r"lists checkpoint-15/model\.safetensors, which is missing"),
    "listed tracking missing": (_set("tracking_steps", list(range(1, 13))),
                                r"lists tracking/11\.safetensors, which is missing \(and 1 more\)"),
    "step a string": (_set("steps", ["5", 10]), r"steps holds \"5\", not a step"),
    "step a bool": (_set("tracking_steps", [True]), r"tracking_steps holds true, not a step"),
    "step negative": (_set("steps", [-5]), r"steps holds -5, not a step"),
    "steps not a list": (_set("tracking_steps", "1-10"), r"tracking_steps is str \"1-10\", not list"),
    "hash not a string": (_set_base("sha256", 123), r"base\.sha256 is int 123, not str"),
    "hash not hex": (_set_base("sha256", "z" * 64), r"base\.sha256 is 'z+', not a sha256 hex digest"),
    "final_step a string": (_set("final_step", "10"), r"final_step is \"10\", not a step or null"),
    "settings a list": (_set("settings", []), r"settings is list \[\], not dict"),
    "tensor shape a string": (_set_tensor("shape", "12x8"), r"tensors\[0\]\.shape is str \"12x8\", not list"),
    "tensor shape edited": (_set_tensor("shape", [8, 12]), r"its manifest lists other tensors"),
    "tensor renamed": (_set_tensor("name", "zz"), r"tensors are not in name order"),
    "steps missing": (_drop("steps"), r"invalid manifest: steps is missing"),
    "base missing": (_drop("base"), r"invalid manifest: base is missing"),
    "label missing": (_drop("base", "label"), r"base\.label is missing"),
    "tensor dtype missing": (_drop("tensors", 0, "dtype"), r"tensors\[0\]\.dtype is missing"),
    "version 4": (_set("version", 4), r"not a geometry-store manifest of version 1, 2, 3"),
    "listed chunk missing": (_set("tracking_chunks", [[1, 4], [5, 8], [9, 9]]),
                             r"lists tracking/chunk-9-9\.safetensors, which is missing"),
    "chunks overlap": (_set("tracking_chunks", [[1, 5], [5, 8]]),
                       r"tracking_chunks\[1\] \[5, 8\] is empty, overlaps or is out of order"),
    "chunk not a pair": (_set("tracking_chunks", [[1, 4, 5]]), r"tracking_chunks\[0\] is \[1, 4, 5\], not \[first"),
    "chunks missing": (_drop("tracking_chunks"), r"invalid manifest: tracking_chunks is missing"),
    "run backwards": (_set("tracking_steps", [[9, 1, 1]]), r"tracking_steps holds \[9, 1, 1\], not a run"),
    "runs overlap": (_set("tracking_steps", [[1, 6, 1], [6, 10, 2]]), r"tracking_steps lists step 6 twice"),
    "not an object": (lambda d: d.clear(), r"not a geometry-store manifest"),
}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """Ten steps, tracking merged four steps a chunk: chunks 1-4 and 5-8, step files 9 and 10."""
    run = tmp_path_factory.mktemp("good") / "run"
    store = Store.open(run, base_tensors(), settings=SETTINGS, config={"model_type": "llama"}, chunk_steps=4)
    write_steps(store, range(1, 11))
    store.close(final_step=10)
    assert sorted(p.name for p in (run / "tracking").iterdir()) == [
        "10.safetensors", "9.safetensors", "chunk-1-4.safetensors", "chunk-5-8.safetensors"]
    return run


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hand_edited_manifest_is_refused_with_one_line(case, good_store, tmp_path, capsys):
    """Every reader refuses the store with the same one line, and nothing in it changes (Store.open cleans
    nothing up, analyze writes no output): the manifest is checked before anything is read or written."""
    from geometry.capture.trajectory import tracking_table
    from geometry.cli import main

    edit, says = HOSTILE[case]
    run = tmp_path / "run"
    shutil.copytree(good_store, run)
    manifest = json.loads((run / MANIFEST).read_text())
    edit(manifest)
    (run / MANIFEST).write_text(json.dumps(manifest))
    before = _files(run)
    readers = {"check_store": lambda: check_store(run), "tracking_table": lambda: tracking_table(run),
               "Store.open (resume)": lambda: Store.open(run, None, settings=SETTINGS),
               "Store.open (base given)": lambda: Store.open(run, base_tensors(), settings=SETTINGS)}
    for reader, call in readers.items():
        with pytest.raises(GeometryError) as err:
            call()
        line = str(err.value)
        assert "\n" not in line, (reader, line)
        if not (case == "wrong base hash" and reader == "Store.open (base given)"):
            assert re.search(says, line), (reader, line)
        else:
            assert "was made from another base" in line
    assert main(["analyze", str(run / "base"), str(run), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(says, err), err
    assert not (tmp_path / "out").exists()
    assert _files(run) == before  # nothing cleaned up, adopted or rewritten


def test_manifest_record_round_trips_and_keeps_steps_ordered():
    man = Manifest("base", "a" * 64, [TensorInfo("w", (3, 2), "bfloat16")], {"track_every": 1})
    for step in (2, 5, 3, 5, 1):  # late or repeated landings keep the lists ascending and unique
        man.add_tracking(step)
    man.add_snapshot(5)
    assert man.tracking_steps == [1, 2, 3, 5] and man.steps == [5] and man.last_complete() == 5
    for indent in (None, 1):
        assert Manifest.from_json(man.to_json(indent)) == man
    assert json.loads(man.to_json())["tracking_steps"] == [[1, 3, 1], 5]  # version 3 writes runs
    old = json.loads(man.to_json())
    del old["final_step"]  # a store that never closed before final_step existed
    old["version"], old["tracking_steps"] = 1, man.tracking_steps  # versions 1-2 list every step
    del old["tracking_chunks"]
    assert Manifest.from_json(json.dumps(old)).version == 1 and Manifest.from_json(json.dumps(old)).final_step is None
    with pytest.raises(GeometryError, match=r"unreadable manifest"):
        Manifest.from_json(b"{not json", "x.json")


def test_missing_or_broken_tracking_and_snapshot_files_are_one_line(good_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_store, run)
    with pytest.raises(GeometryError, match=r"no tracking file for step 11$"):
        read_tracking(run, 11)
    (run / "tracking" / "3.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(GeometryError, match=r"3\.safetensors: unreadable tracking file"):
        read_tracking(run, 3)
    with pytest.raises(GeometryError, match=r"checkpoint-15/model\.safetensors: missing \(snapshot of step 15\)"):
        read_snapshot(run, 15)


FIXTURE_CHECK = textwrap.dedent("""
    from geometry.capture.store import Store

    def test_leaves_a_writer(tmp_path):
        Store.open(tmp_path / "run", {"w": __import__("torch").zeros(2, 2)}, settings={})
""")


def test_a_test_leaving_a_writer_thread_fails(tmp_path):
    """The autouse fixture in conftest.py: a store left open fails the test that left it."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leak.py").write_text(FIXTURE_CHECK)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert "1 passed, 1 error" in out.stdout and "outlived the test" in out.stdout, out.stdout[-2000:]


def test_check_store_reads_the_base_a_tensor_at_a_time(tmp_path):
    """A reader checks base/ against the manifest without holding it whole: in a fresh process, 8 tensors of
    16 MiB raise its peak memory by about one tensor, not by the base's 128 MiB."""
    run = tmp_path / "run"
    big = {f"layers.{i}.mlp.up_proj.weight": torch.full((2048, 2048), float(i)) for i in range(8)}
    Store.open(run, big, settings=SETTINGS).close()
    del big
    code = textwrap.dedent(f"""
        import re
        def hwm():
            return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
        from geometry.capture.store import check_store
        before = hwm()
        check_store({str(run)!r})
        print(hwm() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 64, f"checking a 128 MiB base raised peak memory by {grew} MiB"
