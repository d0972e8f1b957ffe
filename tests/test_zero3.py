"""Recording under DeepSpeed ZeRO-3 for real: two CPU processes (DeepSpeed's CPU accelerator, gloo).

A tiny Llama is trained by a ZeRO-3 DeepSpeedEngine on both ranks with the same batches (so the averaged
gradient is the single-process one), GeometryCallback driven as the Trainer drives it: on_step_end after
``engine.step()``. Every rank holds a shard of each matrix (``p.ds_id``, ``p.numel() == 0`` outside a
gather); the recorder gathers one matrix at a time on every rank (geometry.capture.distributed) and rank 0
writes. Checked: the snapshots equal the full weights gathered independently at the end of the same step,
and every tracked step equals a single-process run of the same steps, so that an update is the difference
between consecutive step-end states (DeepSpeed moves the weights inside ``engine.step``: a recorder that
read them at any other point would be a step off).
"""

import textwrap
from pathlib import Path

import pytest
import torch
import workers

from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.subspaces import subspace_sim

pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install deepspeed==0.19.8")

STEPS = 4
CONFIG = dict(snapshot_every=2, lock_k=4, oversample=4)

COMMON = workers.tiny_llama_source(1) + textwrap.dedent("""
    def loss(model, step):  # the same batch on every rank: ZeRO averages two equal gradients
        x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))
        return model(input_ids=x, labels=x).loss
""")

WORKER = COMMON + textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import deepspeed
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState
    from geometry.capture.callbacks import GeometryCallback
    from geometry.capture.distributed import is_sharded, layout
    from geometry.capture.recorder import RecorderConfig

    torch.set_num_threads(1)
    out, steps, config = Path(sys.argv[1]), int(sys.argv[2]), eval(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = tiny_llama()
    ds_config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                      config=ds_config)
    q = engine.module.model.layers[0].self_attn.q_proj.weight
    print(f"rank {rank}: layout {layout(q)} sharded {is_sharded(engine.module)} local {q.numel()}", flush=True)

    def oracle(step):  # the full weights at this step's end, by an independent gather of all of them at once
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            full = {n: p.detach().clone() for n, p in params.items()}
        if rank == 0:
            torch.save(full, out / f"oracle-{step}.pt")

    cb = GeometryCallback(out / f"store-rank{rank}", RecorderConfig(**config))
    state, control = TrainerState(max_steps=steps), TrainerControl()
    state.is_world_process_zero = rank == 0
    args = type("Args", (), {"output_dir": str(out / "trainer"), "process_index": rank, "deepspeed": ds_config})()
    cb.on_train_begin(args, state, control, model=engine)  # the Trainer passes the engine as model
    for t in range(1, steps + 1):
        engine.backward(loss(engine, t))
        engine.step()  # the optimizer moves the shards here
        state.global_step = t
        cb.on_step_end(args, state, control)
        if t % config["snapshot_every"] == 0:
            oracle(t)
    cb.on_train_end(args, state, control)
    dist.barrier()

    # Then the same recording through transformers.Trainer(deepspeed=...) itself, in the same processes:
    # accelerate builds the ZeRO-3 engine, the Trainer calls the callbacks. Oracle, listed after
    # GeometryCallback, gathers every weight at the start and at every step end (the states the recorder read).
    from transformers import Trainer, TrainerCallback, TrainingArguments
    out = out / "hf"
    out.mkdir(exist_ok=True)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(0))
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    class Oracle(TrainerCallback):
        def save(self, model, step):
            params = dict(model.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                full = {n: p.detach().clone() for n, p in params.items()}
            if dist.get_rank() == 0:
                torch.save(full, out / f"oracle-{step}.pt")

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            q = model.model.layers[0].self_attn.q_proj.weight
            print(f"rank {dist.get_rank()}: Trainer: layout {layout(q)} local {q.numel()}", flush=True)
            self.save(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.save(model, state.global_step)

    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                 "optimizer": {"type": "SGD", "params": {"lr": "auto"}}}
    args = TrainingArguments(output_dir=str(out / "output"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=0.5, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0, deepspeed=ds_config, ddp_backend="gloo")
    cb = GeometryCallback(out / f"store-rank{rank}", RecorderConfig(**config))
    Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[cb, Oracle()]).train()
    dist.barrier()
    print(f"rank {rank}: done", flush=True)
    sys.stdout.flush()
    os._exit(0)
""")


def launch(out: Path, worker: str) -> list[str]:
    """Two worker processes running ``worker``; their logs."""
    script = out / "worker.py"
    script.write_text(worker)
    logs = workers.launch(script, [str(out), str(STEPS), repr(CONFIG)], env={"DS_ACCELERATOR": "cpu"}, timeout=300,
                          what="ZeRO-3 workers")
    for r, log in enumerate(logs):
        assert f"rank {r}: done" in log, f"rank {r} failed:\n{log[-4000:]}"
    return logs


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, launch(out, WORKER)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same steps in one process, plain SGD: the reference store."""

    def step(ns, model, opt, t):
        ns["loss"](model, t).backward()
        opt.step()
        opt.zero_grad()

    return workers.single_process_store(COMMON, tmp_path_factory.mktemp("single") / "store", CONFIG, STEPS, step)


def test_zero3_shards_are_gathered_and_rank0_records_the_step_end_states(launched, single):
    out, logs = launched
    for r in (0, 1):  # really sharded: each rank holds an empty local view of q_proj outside a gather
        assert f"rank {r}: layout zero3 sharded True local 0" in logs[r]
    store = out / "store-rank0"
    man, ref = read_manifest(store), read_manifest(single)
    assert not (out / "store-rank1").exists()  # rank 1 took part in the gathers and wrote nothing
    assert man.steps == ref.steps == [2, 4] and man.tracking_steps == ref.tracking_steps == [1, 2, 3, 4]
    assert man.tensors == ref.tensors and man.base_sha256 == ref.base_sha256  # full shapes, the same W0
    assert man.final_step == STEPS
    base = read_snapshot(store, None)
    for t in man.steps:
        got, want, oracle = read_snapshot(store, t), read_snapshot(single, t), torch.load(out / f"oracle-{t}.pt")
        assert set(got) == set(want)
        for name, w in got.items():
            assert not torch.equal(w, base[name]), (t, name)  # trained: every tracked matrix moved
            assert torch.equal(w, oracle[name]), (t, name)  # exactly the step-end weights gathered independently
            assert torch.allclose(w, want[name], rtol=0, atol=1e-5), (t, name)
    for t in man.tracking_steps:  # D_t = (state at the end of step t) - W0, step by step as in one process
        got, want = read_tracking(store, t), read_tracking(single, t)
        assert set(got) == set(want)
        for name, st in got.items():
            assert st.fro == pytest.approx(want[name].fro, rel=1e-3), (t, name)
            assert float(subspace_sim(st.v, want[name].v)) > 0.99, (t, name)


def test_zero3_under_the_trainer_records_the_step_end_states(launched):
    """transformers.Trainer(deepspeed=ZeRO-3 config) on two CPU processes, GeometryCallback among its callbacks:
    the base is the weights before training, each snapshot the weights at that step's end, and each tracked
    step's ||D_t||_F and top singular subspace those of (step-end weights) - (initial weights), all against
    the same states gathered independently."""
    out, logs = launched
    out = out / "hf"
    for r in (0, 1):
        assert f"rank {r}: Trainer: layout zero3 local 0" in logs[r]
    store = out / "store-rank0"
    man = read_manifest(store)
    assert not (out / "store-rank1").exists()
    assert man.steps == [2, 4] and man.tracking_steps == [1, 2, 3, 4] and man.final_step == STEPS
    oracle = {t: torch.load(out / f"oracle-{t}.pt") for t in range(STEPS + 1)}
    base = read_snapshot(store, None)
    assert len(base) == 7 and all(torch.equal(w, oracle[0][n]) for n, w in base.items())
    for t in man.steps:
        assert all(torch.equal(w, oracle[t][n]) for n, w in read_snapshot(store, t).items()), t
    for t in man.tracking_steps:
        for name, st in read_tracking(store, t).items():
            d = (oracle[t][name] - oracle[0][name]).double()
            assert float(d.norm()) > 0
            _, S, Vh = torch.linalg.svd(d, full_matrices=False)
            assert st.fro == pytest.approx(float(d.norm()), rel=1e-4), (t, name)
            assert float(st.s[0]) == pytest.approx(float(S[0]), rel=1e-2), (t, name)
            assert float(subspace_sim(st.v, Vh[:4].mT)) > 0.98, (t, name)
