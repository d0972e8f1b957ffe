"""Training-time capture: what GeometryCallback costs a transformers.Trainer run, side by side in one run.

A tiny Llama trained on the CPU (HF Trainer, AdamW at a constant learning rate, so that late steps move the
weights as much as early ones) with random tokens, once per setting:
- no callback;
- snapshots every 50 steps, no tracking;
- per-step tracking at K=16 (and snapshots every 50);
- tracking every 4th step (the cheaper subset).
Printed: median and mean step time and their ratio to no callback (a step is the wall time between two
on_step_end events, the recorder's work included; warm-up steps dropped); bytes written per tracked
step vs per snapshot; and, for snapshots, the training thread's time per snapshot (CPU copies and
queueing) against the writer thread's time to write one (the disk work it takes off the training thread).
The settings take turns, ``--repeats`` rounds of one run each, so that a busy machine slows them alike.

    python benchmarks/bench_recorder.py                        # hidden 256, 4 layers, 8 x 128 tokens a step
    python benchmarks/bench_recorder.py --batch 16 --hidden 512

Per-step tracking does one warm-started subspace iteration for most matrix-steps, more while D_t is young:
runs of a few dozen steps measure that transient more than a training run's steady state.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from geometry.capture.callbacks import GeometryCallback
from geometry.capture.layout import read_snapshot, save_folder
from geometry.capture.recorder import RecorderConfig
from geometry.capture.store import read_manifest

WARMUP = 5  # steps dropped from the timings: allocator and kernel warm-up


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class StepTimer(TrainerCallback):
    """Wall time between consecutive on_step_end events. Listed last, so a step includes the recorder's work."""

    def __init__(self):
        self.times: list[float] = []
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t is None:
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self._t = now


def model_for(a) -> LlamaForCausalLM:
    torch.manual_seed(0)
    heads = a.hidden // 64
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
                      num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=a.seq)
    return LlamaForCausalLM(cfg)


def run(a, out: Path, config: RecorderConfig | None):
    """One Trainer run; returns (per-step seconds after warm-up, the GeometryCallback or None)."""
    timer = StepTimer()
    cb = GeometryCallback(out / "geometry", config) if config is not None else None
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=1e-4, lr_scheduler_type="constant", use_cpu=a.device == "cpu", report_to=[],
                             save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callbacks = [cb, timer] if cb is not None else [timer]
    Trainer(model=model_for(a), args=args, train_dataset=Tokens(a.steps * a.batch, a.seq, a.vocab),
            callbacks=callbacks).train()
    return timer.times[WARMUP:], cb


def write_seconds(store: Path, repeats: int = 3) -> float:
    """The writer thread's work for one snapshot (safetensors file, fsyncs, rename), timed here on its own."""
    tensors = read_snapshot(store, read_manifest(store).steps[-1])
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        save_folder(tensors, store / f"bench-write-{i}", None)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 64 (default 256)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="rounds of one run per setting (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the Trainer runs (benchmarks/gpu.sh)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = {
        "no callback": None,
        "snapshots every 50": RecorderConfig(snapshot_every=50, track_every=0),
        f"tracking every step, K={a.k}": RecorderConfig(snapshot_every=50, track_every=1, lock_k=a.k),
        f"tracking every 4th step, K={a.k}": RecorderConfig(snapshot_every=50, track_every=4, lock_k=a.k),
    }
    n_params = sum(p.numel() for p in model_for(a).parameters())
    print(f"Llama hidden {a.hidden}, {a.layers} layers, {n_params / 1e6:.1f}M parameters; batch {a.batch} x {a.seq} = "
          f"{a.batch * a.seq} tokens a step; {a.repeats} runs x {a.steps} steps per setting, {WARMUP} warm-up steps "
          f"dropped per run; {torch.get_num_threads()} torch threads\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        times = {label: [] for label in settings}
        last = {}
        for r in range(a.repeats):
            for i, (label, cfg) in enumerate(settings.items()):
                out = Path(tmp) / f"{i}-{r}"
                t, last[label] = run(a, out, cfg)
                times[label] += t
                if r < a.repeats - 1:
                    shutil.rmtree(out)
        for label in settings:
            rows.append((label, statistics.median(times[label]), statistics.fmean(times[label]), last[label]))
        base_med, base_mean = rows[0][1], rows[0][2]
        store = Path(tmp) / f"2-{a.repeats - 1}" / "geometry"
        man = read_manifest(store)
        n_matrices = len(man.tensors)
        print(f"{'setting':34} {'median step':>12} {'ratio':>7} {'mean step':>10} {'ratio':>7} "
              f"{'recorder/step':>14} {'iters/matrix':>13}")
        for label, med, mean, cb in rows:
            per = its = ""
            if cb is not None:
                st = cb.stats
                per = f"{(st.tracking_seconds + st.snapshot_seconds) / a.steps * 1e3:.1f} ms"  # last run
                its = f"{st.iterations / (st.tracked_steps * n_matrices):.2f}" if st.tracked_steps else ""
            print(f"{label:34} {med:11.4f}s {med / base_med:6.3f}x {mean:9.4f}s {mean / base_mean:6.3f}x "
                  f"{per:>14} {its:>13}")

        # all tracking files over the steps they hold (step files and chunks of merged steps alike)
        track_bytes = sum(p.stat().st_size for p in (store / "tracking").iterdir()) / len(man.tracking_steps)
        snap_bytes = (store / f"checkpoint-{man.steps[-1]}" / "model.safetensors").stat().st_size
        print(f"\nbytes written per tracked step: {track_bytes / 2**10:9.1f} KiB   (u, v in float16, K={a.k})")
        print(f"bytes written per snapshot:     {snap_bytes / 2**10:9.1f} KiB   ({len(man.tensors)} matrices, "
              f"{snap_bytes / track_bytes:.0f}x a tracked step)")
        stats = rows[1][3].stats
        print(f"snapshot, training thread:      {stats.snapshot_seconds / stats.snapshots * 1e3:9.1f} ms   "
              f"(CPU copies and queueing, {stats.snapshots} snapshots)")
        print(f"snapshot, writer thread:        {write_seconds(store) * 1e3:9.1f} ms   (file, fsyncs, rename: "
              "off the training thread)")


if __name__ == "__main__":
    main()
