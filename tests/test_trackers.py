"""GeometryCallback's values in the Trainer's experiment trackers: a real TensorBoard run read back, W&B offline."""

import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from geometry.capture.callbacks import GeometryCallback
from geometry.capture.recorder import RecorderConfig
from geometry.capture.store import read_manifest, read_snapshot
from geometry.capture.trajectory import LIVE_METRICS, tracking_table
from geometry.metrics import changed_mask

pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=128, seq=16, vocab=96):
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.x = (start + torch.arange(seq)) % vocab  # sequences counting up: learnable

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def train(tmp_path, callbacks, report_to, steps=12, logging_steps=4, model=None):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, use_cpu=True, report_to=report_to, save_strategy="no",
                             logging_steps=logging_steps, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model or tiny_llama(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


def expected(run, steps):
    """Per logged step, the values the store says: means over matrices of its tracking table, and the pooled
    bf16 sparsity of its snapshots."""
    table, base, man = tracking_table(run), read_snapshot(run, None), read_manifest(run)
    out = {}
    for t in steps:
        vals = {}
        for m in LIVE_METRICS:
            xs = [v for v in table.where(step=t, metric=m).values() if not math.isnan(v)]
            if xs:
                vals[m] = sum(xs) / len(xs)
        if t in man.steps:
            snap = read_snapshot(run, t)
            changed = sum(int(changed_mask(base[n], w).sum()) for n, w in snap.items())
            vals["sparsity_bf16"] = 1 - changed / sum(w.numel() for w in snap.values())
        out[t] = vals
    return out


def check(got, want):
    """got[step][metric] against the store's values: fro norms and stable ranks from the same numbers, Sim_K
    within the float16 rounding of the stored subspaces."""
    assert sorted(got) == sorted(want)
    for t, vals in want.items():
        assert sorted(got[t]) == sorted(vals), t
        for m, v in vals.items():
            tol = 2e-3 if m.startswith("track_sim") else 1e-5
            assert got[t][m] == pytest.approx(v, rel=tol, abs=tol), (t, m)


def test_tensorboard_event_files_hold_the_store_values(tmp_path):
    """report_to=["tensorboard"], logging_steps=4, 12 steps, snapshots every 8 (and the last): the event files
    hold train/geometry/<metric> at steps 4, 8, 12, equal to the store's tracking means and snapshot sparsity;
    the Trainer's own tags (loss) are there too, and trainer.state.log_history carries the same values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "geometry"
    trainer = train(tmp_path, [GeometryCallback(run, RecorderConfig(snapshot_every=8))], ["tensorboard"])
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "trainer") for f in fs if "tfevents" in f]
    assert len(files) == 1
    acc = EventAccumulator(files[0])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags
    geo = sorted(t for t in tags if t.startswith("train/geometry/"))
    assert geo == sorted(f"train/geometry/{m}" for m in (*LIVE_METRICS, "sparsity_bf16")), geo
    got: dict[int, dict[str, float]] = {}
    for tag in geo:
        for e in acc.Scalars(tag):
            got.setdefault(e.step, {})[tag.removeprefix("train/geometry/")] = e.value
    want = expected(run, [4, 8, 12])
    assert want[4]["track_fro_norm"] > 0 and 0 < want[8]["sparsity_bf16"] < 1
    check(got, want)
    history = {h["step"]: {k.removeprefix("geometry/"): v for k, v in h.items() if k.startswith("geometry/")}
               for h in trainer.state.log_history if any(k.startswith("geometry/") for k in h)}
    check(history, want)
    assert not any(type(c).__name__ == "_LogMerger" for c in trainer.callback_handler.callbacks)  # removed again


def test_log_false_adds_nothing(tmp_path):
    trainer = train(tmp_path, [GeometryCallback(tmp_path / "geometry", log=False)], [], steps=4)
    assert trainer.state.log_history and not any(k.startswith("geometry/") for h in trainer.state.log_history
                                                 for k in h)


def test_wandb_offline_run_holds_the_store_values(tmp_path, monkeypatch):
    """W&B in offline mode (no network): the run's history file holds train/geometry/<metric> per step."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "geometry"
    train(tmp_path, [GeometryCallback(run, RecorderConfig(snapshot_every=8))], ["wandb"])
    wandb.finish()  # the Trainer leaves the run open
    wandb.teardown()  # ends W&B's service process, which writes the run file out
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    check(wandb_history(files[0]), expected(run, [4, 8, 12]))


def wandb_history(path):
    """step -> {metric: value} of train/geometry/* in an offline W&B run file: a LevelDB-format log (7-byte
    file header, 32 KiB blocks of records: crc32 4, length 2, type 1 [full, first, middle, last]) of
    wandb_internal_pb2.Record protobufs; history records carry the items, and train/global_step."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768  # a block's tail too short for a header is padding
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    out = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
        geo = {k.removeprefix("train/geometry/"): v for k, v in items.items() if k.startswith("train/geometry/")}
        if geo:
            out[items["train/global_step"]] = geo
    return out
