"""Faults while recording: SIGKILL at random moments, unwritable and full disks, a store lost mid-run.

The kill test runs a recording training loop in a child process and kills it at seeded random moments,
again and again on the same store, each child resuming from the loop's own training checkpoint (saved
after ``rec.flush()``, as GeometryCallback does before the Trainer saves). After every kill the store
must load and everything it lists must be intact; in the end the run must hold every step exactly once,
with the same weights as an uninterrupted run (the loop is deterministic per step).

Full and read-only file systems are real ones: a small tmpfs mounted in a private mount namespace
(``unshare``). Where the kernel allows no such namespace those tests are skipped, saying so.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from geometry import analyze
from geometry.capture.callbacks import GeometryCallback
from geometry.capture.layout import CREATING
from geometry.capture.recorder import Recorder, RecorderConfig
from geometry.capture.store import MANIFEST, read_manifest, read_snapshot, read_tracking
from geometry.capture.trajectory import tracking_table
from geometry.errors import GeometryError
from geometry.offline.sources import open_run
from geometry.subspaces import subspace_sim

ROOT = Path(__file__).parent.parent
N, SNAP = 150, 10  # steps of the killed run; a snapshot every SNAP steps, tracking every step

# A deterministic training loop: step t's batch depends on t only, the training checkpoint holds model and
# optimizer, so a run resumed from any checkpoint reproduces the uninterrupted run's weights bit for bit.
LOOP = textwrap.dedent("""
    import os, shutil, warnings
    from pathlib import Path
    import torch
    from torch import nn
    from geometry.capture.recorder import Recorder, RecorderConfig

    def train(run, ckpt, steps, snapshot_every, ckpt_every=7, on_ready=None):
        run, ckpt = Path(run), Path(ckpt)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 48))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        start = 0
        if ckpt.exists():
            state = torch.load(ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        else:  # no training checkpoint: a new run, and a new store
            shutil.rmtree(run, ignore_errors=True)
        if on_ready:
            on_ready()
        # tracking merged 8 steps a chunk (store version 3): the kills land in merges too
        cfg = RecorderConfig(snapshot_every=snapshot_every, lock_k=4, oversample=4, tracking_chunk=8)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*stay missing")  # a resumed run must miss no step
            rec = Recorder(model, run, cfg, step=start)
        with rec:
            for t in range(start + 1, steps + 1):
                g = torch.Generator().manual_seed(t)
                x, y = torch.randn(64, 96, generator=g), torch.randn(64, 48, generator=g)
                (model(x) - y).square().mean().backward()
                opt.step()
                opt.zero_grad()
                rec.step(t)
                if t % ckpt_every == 0:
                    rec.flush()  # the store holds step t before the checkpoint that resumes after it
                    tmp = ckpt.with_name(ckpt.name + ".tmp")
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": t}, tmp)
                    os.replace(tmp, ckpt)
        return model
""")

CHILD = LOOP + textwrap.dedent("""
    import sys
    torch.set_num_threads(1)
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), on_ready=lambda: print("ready", flush=True))
    print("done", flush=True)
""")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the children use one thread: the same kernels, the same bits
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process: its store and how long its training took."""
    ns = {}
    exec(LOOP, ns)
    d = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ns["train"](d / "run", d / "ckpt.pt", N, SNAP)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(n)
    return d / "run", seconds


def check_intact(run: Path, ref: Path, offline: bool = True):
    """What a killed run's store lists loads, has every tracked tensor with its shape, and equals the
    uninterrupted run at that step; the generic readers accept it (``analyze`` too when offline)."""
    man = read_manifest(run)
    shapes = {t.name: t.shape for t in man.tensors}
    base = read_snapshot(run, None)
    assert all(torch.equal(base[n], w) for n, w in read_snapshot(ref, None).items())
    for t in man.steps:
        snap = read_snapshot(run, t)
        assert {n: tuple(w.shape) for n, w in snap.items()} == shapes
        want = read_snapshot(ref, t)
        assert all(torch.equal(snap[n], want[n]) for n in shapes), t
    for t in man.tracking_steps:
        tr, want = read_tracking(run, t), read_tracking(ref, t)
        assert set(tr) == set(shapes)
        for n, st in tr.items():
            assert st.u.shape == (shapes[n][0], 4) and st.v.shape == (shapes[n][1], 4)
            assert st.fro == pytest.approx(want[n].fro, rel=1e-6)
    if man.steps:
        assert set(man.steps) <= {c.step for c in open_run(run)}  # a folder may land before its manifest entry
        if offline:
            assert analyze(run / "base", [run]).unique("step")
    assert tracking_table(run).unique("step") == man.tracking_steps
    return man


def test_sigkill_at_random_moments_then_resume(tmp_path, reference):
    ref, seconds = reference
    rng = random.Random(0)
    run, ckpt = tmp_path / "run", tmp_path / "ckpt.pt"
    kills, trials, scale = 0, 0, 1.0
    while kills < 10:
        trials += 1
        assert trials <= 20, "the children finish before the kills land: lengthen the run"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(ckpt), str(N), str(SNAP)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        left = 1 - (torch.load(ckpt)["step"] / N if ckpt.exists() else 0)  # a resumed child has less to do
        delay = rng.uniform(0.0, left * seconds * scale)  # from (re)opening the store to closing it
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate()
        if "done" not in out:
            assert child.returncode == -signal.SIGKILL, err[-3000:]
            kills += 1
        exists = (run / MANIFEST).exists()
        print(f"trial {trials}: killed after {delay:.3f} s, finished {'done' in out}, store "
              f"{read_manifest(run).tracking_steps[-1:] if exists else None}")  # shown if the test fails
        if exists:
            check_intact(run, ref, offline=kills % 4 == 1)
        else:  # killed while the store was being created: nothing was recorded, nothing can be resumed
            assert not ckpt.exists()
        if "done" in out:  # the reference ran slower than this child (a loaded machine): aim earlier
            scale *= 0.7
        if "done" in out or kills in (4, 8):  # a new run now and then: kills spread over whole runs
            shutil.rmtree(run, ignore_errors=True)
            ckpt.unlink(missing_ok=True)

    # resume to the end: every step exactly once, the uninterrupted run's weights and locking curves
    done = subprocess.run([sys.executable, "-c", CHILD, str(run), str(ckpt), str(N), str(SNAP)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    man = check_intact(run, ref)
    assert man.tracking_steps == list(range(1, N + 1))
    assert len(man.tracking_chunks) >= N // 8 - 2 and man.tracking_chunks[-1][1] >= N - 8  # merged as it went
    assert man.steps == list(range(SNAP, N + 1, SNAP)) and man.final_step == N
    final, want = read_tracking(run, N), read_tracking(ref, N)
    assert all(float(subspace_sim(final[n].v, want[n].v)) > 0.99 for n in final)
    assert not [p for p in run.rglob(".tmp*")]


def test_a_base_written_without_its_manifest_can_be_recorded_again(tmp_path):
    """A kill between base/ landing and the first manifest leaves base/ and the creation marker: a new
    recorder takes the folder as the unfinished creation it is, while a foreign folder stays refused."""
    model = torch.nn.Linear(8, 6)
    run = tmp_path / "run"
    with Recorder(model, run):
        pass
    (run / MANIFEST).unlink()
    shutil.rmtree(run / "tracking")
    (run / CREATING).write_text("killed mid-creation")
    Recorder(model, run).close()
    assert read_manifest(run).steps == []  # created anew: a valid, empty store
    assert not (run / CREATING).exists()
    foreign = tmp_path / "foreign"
    (foreign / "base").mkdir(parents=True)
    with pytest.raises(GeometryError, match="not empty"):
        Recorder(model, foreign)


# ---- start-up errors: before any training step ----

def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def test_unwritable_store_is_refused_at_creation(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(GeometryError, match=r"cannot write the geometry store .*a-file/geometry: Not a directory"):
        GeometryCallback(blocker / "geometry")  # before the Trainer even exists
    with pytest.raises(GeometryError, match="cannot write the geometry store"):
        Recorder(tiny_llama(), blocker / "geometry")


def namespace_prefix() -> list[str] | None:
    """A command prefix giving a private mount namespace in which we may mount a tmpfs, or None."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        try:
            ok = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                                capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


NAMESPACE = namespace_prefix()
needs_mounts = pytest.mark.skipif(NAMESPACE is None, reason="no private mount namespace here (unshare -rm and "
                                  "unshare -m refused), so no real small or read-only file system to test with")


def in_small_fs(tmp_path, code: str, size: str, ro: bool = False) -> subprocess.CompletedProcess:
    """Run python code with a fresh tmpfs of ``size`` (read-only if ro) mounted at tmp_path / 'fs'."""
    fs = tmp_path / "fs"
    fs.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    script = f"mount -t tmpfs -o {opts} tmpfs {fs} && exec {sys.executable} -c \"$0\" {fs}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*NAMESPACE, "sh", "-c", script, code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


STARTUP = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from geometry.capture.callbacks import GeometryCallback
    from geometry.errors import GeometryError
    from geometry.capture.recorder import Recorder
    fs = Path(sys.argv[1])
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))  # 512 KiB of weights
    for make in (lambda: GeometryCallback(fs / "geometry"), lambda: Recorder(model, fs / "geometry")):
        try:
            make()
            print("created")
        except GeometryError as e:
            print("GeometryError:", e)
""")


@needs_mounts
def test_read_only_file_system_is_refused_at_creation(tmp_path):
    out = in_small_fs(tmp_path, STARTUP, "1m", ro=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("cannot write the geometry store" in x and "Read-only file system" in x
                                   for x in lines), out.stdout


@needs_mounts
def test_full_file_system_is_refused_at_creation(tmp_path):
    out = in_small_fs(tmp_path, STARTUP, "256k")
    assert out.returncode == 0, out.stderr[-3000:]
    callback, recorder = out.stdout.splitlines()
    assert callback == "created"  # the folder is writable; the size of a snapshot is known with the model only
    assert recorder.startswith("GeometryError: not enough disk space for the geometry store")


# ---- failures mid-run: on_error="warn" keeps training, "raise" stops it with the cause ----

class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class RemoveStoreAt(TrainerCallback):
    """A real failure, not a mock: the store's folder disappears after a step (moved away at once, where an
    rm -rf would race with the writer thread's files), so every later write finds no folder."""

    def __init__(self, store: Path, step: int):
        self.store, self.step = store, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.rename(self.store, self.store.with_name("moved-away"))


def train(tmp_path, callbacks, steps=8, resume=None, **kw):
    kw.setdefault("save_strategy", "no")
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
                             seed=0, **kw)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_store_lost_mid_run_warn_keeps_training(tmp_path):
    store = tmp_path / "geometry"
    cb = GeometryCallback(store, RecorderConfig(snapshot_every=2, on_error="warn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, [RemoveStoreAt(store, 3), cb])
    assert trainer.state.global_step == 8  # training went on to the end
    failed = [str(w.message) for w in caught if "geometry store" in str(w.message)]
    assert failed and all("failed" in m for m in failed)
    assert cb.stats.tracked_steps == 8  # the recorder kept working; only its writes failed


def test_store_lost_mid_run_raise_stops_training(tmp_path):
    store = tmp_path / "geometry"
    with pytest.raises(GeometryError, match=r"geometry store .* (snapshot|tracking) of step \d+ failed"):
        train(tmp_path, [RemoveStoreAt(store, 3), GeometryCallback(store, RecorderConfig(snapshot_every=2))])


MIDRUN = textwrap.dedent("""
    import sys, warnings, torch
    from pathlib import Path
    from geometry.errors import GeometryError
    from geometry.capture.recorder import Recorder, RecorderConfig
    from geometry.capture.store import read_manifest
    fs, on_error = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))  # 128 KiB a snapshot
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warnings.simplefilter("always")
    try:
        with warnings.catch_warnings(record=True) as caught, \\
                Recorder(model, fs / "geometry", RecorderConfig(snapshot_every=1, lock_k=4, on_error=on_error)) as rec:
            for t in range(1, 11):
                model(torch.randn(8, 128)).square().mean().backward()
                opt.step(); opt.zero_grad()
                rec.step(t)
        print("trained", t, "warnings", sum("No space left on device" in str(w.message) for w in caught))
    except GeometryError as e:
        print("stopped at", t, "GeometryError:", e)
    print("listed", read_manifest(fs / "geometry").steps)
""")


@needs_mounts
@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_disk_fills_up_mid_run(tmp_path, on_error):
    """A 600 KiB file system: the base and a couple of 128 KiB snapshots fit, then the disk is full (ENOSPC)."""
    out = in_small_fs(tmp_path, MIDRUN.replace("sys.argv[2]", repr(on_error)), "600k")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    listed = eval(lines[-1].removeprefix("listed "))
    assert 1 <= len(listed) < 10 and listed == list(range(1, len(listed) + 1))  # what it lists landed whole
    if on_error == "warn":
        assert lines[0].startswith("trained 10 warnings") and int(lines[0].split()[-1]) >= 1
    else:
        assert "GeometryError: geometry store" in lines[0] and "No space left on device" in lines[0]


# ---- a Trainer resumed from its own checkpoint ----

class StopAt(TrainerCallback):
    """Ends training after a step, as a crash would (the Trainer's last checkpoint is older)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class StoreAheadOfCheckpoints(TrainerCallback):
    """At every Trainer save, the store already lists the step being saved (GeometryCallback flushed)."""

    def __init__(self, store: Path):
        self.store, self.seen = store, []

    def on_save(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, read_manifest(self.store).tracking_steps[-1]))


def test_trainer_resume_from_its_checkpoint_continues_the_store(tmp_path):
    """Trainer checkpoints every 3 steps; the run stops after step 5 and resumes from checkpoint-3: steps 4, 5
    are already recorded and skipped, 6..8 are added, each step once."""
    store = tmp_path / "geometry"
    watch = StoreAheadOfCheckpoints(store)
    cfg = RecorderConfig(snapshot_every=4)
    train(tmp_path, [GeometryCallback(store, cfg), watch, StopAt(5)], save_strategy="steps", save_steps=3)
    assert watch.seen == [(3, 3)]
    assert read_manifest(store).tracking_steps == [1, 2, 3, 4, 5]
    cb = GeometryCallback(store, cfg)
    train(tmp_path, [cb, watch], save_strategy="steps", save_steps=3,
          resume=str(tmp_path / "trainer" / "checkpoint-3"))
    assert watch.seen == [(3, 3), (6, 6), (8, 8)]
    man = read_manifest(store)
    assert man.tracking_steps == list(range(1, 9)) and man.steps == [4, 5, 8] and man.final_step == 8
    assert cb.stats.tracked_steps == 3  # 6, 7, 8 (8 again, refined, with the final snapshot)
