"""DeepSpeed ZeRO checkpoints (geometry.offline.zero) written for real: two CPU processes (DeepSpeed's CPU
accelerator, gloo) train a tiny Qwen2 under ZeRO-2 and ZeRO-3 and ``engine.save_checkpoint`` after each step
(``global_stepN/`` and ``latest``); rank 0 saves the same step-end weights, gathered, as HF folders. Odd sizes
(45 MLP rows, 65 vocabulary rows) make the partitions split parameters. Checked: every tensor read back bit for
bit, the same tidy table as the HF folders, a Trainer ``checkpoint-N`` holding only a ZeRO checkpoint, and bad
input (no opt-in, no DeepSpeed, a missing or truncated partition) refused in one line."""

import shutil
import sys
import textwrap

import pytest
import torch
import workers

from geometry import AnalysisConfig, analyze
from geometry.errors import GeometryError
from geometry.offline.sources import open_run

pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install geometry[deepspeed]")

WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = Qwen2Config(vocab_size=65, hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    for stage in (2, 3):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        if rank == 0 and stage == 2:
            model.save_pretrained(out / "base")
        ds_config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
                     "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                          config=ds_config)
        for step in (1, 2):
            x = torch.randint(0, 65, (4, 12), generator=torch.Generator().manual_seed(10 * step + rank))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            engine.save_checkpoint(str(out / f"zero{stage}"))
            params = dict(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
                full = {n: p.detach().clone() for n, p in params.items()}
            if rank == 0:
                hf = out / f"hf{stage}" / f"checkpoint-{step}"
                hf.mkdir(parents=True)
                save_file(full, str(hf / "model.safetensors"))
                cfg.save_pretrained(hf)
        dist.barrier()
    print(f"rank {rank}: done", flush=True)
    sys.stdout.flush()
    os._exit(0)
""")

CFG = AnalysisConfig(device="cpu", threads=1, lock_k=2, allow_pickle=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    script = out / "worker.py"
    script.write_text(WORKER)
    logs = workers.launch(script, [str(out)], env={"DS_ACCELERATOR": "cpu"}, timeout=300, what="DeepSpeed workers")
    for r, log in enumerate(logs):
        assert f"rank {r}: done" in log, f"rank {r} failed:\n{log[-4000:]}"
    return out


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # NaN where both are


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_read_back_bit_for_bit(saved, stage):
    ds, hf = open_run(saved / f"zero{stage}", allow_pickle=True), open_run(saved / f"hf{stage}")
    assert [(c.step, c.label) for c in ds] == [(1, "global_step1"), (2, "global_step2")]
    assert (saved / f"zero{stage}" / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for d, h in zip(ds, hf, strict=True):
        assert d.source.names() == h.source.names() and len(d.source.names()) == 27
        assert any(f"ZeRO-{3 if stage == 3 else '1/2'}, fp32 master weights" in n for n in d.source.notes)
        for name in h.source.names():
            want = h.source.read(name)
            assert d.source.shape(name) == tuple(want.shape) and d.source.dtype(name) == torch.float32
            assert torch.equal(d.source.read(name), want), (stage, d.step, name)
            if want.dim() == 2:
                assert torch.equal(d.source.read(name, slice(20, 30)), want[20:30])


@pytest.mark.parametrize("stage", [2, 3])
def test_analysis_of_a_zero_run_is_the_analysis_of_the_hf_folders(saved, stage):
    a = analyze(str(saved / "base"), [str(saved / f"zero{stage}")], config=CFG)
    b = analyze(str(saved / "base"), [str(saved / f"hf{stage}")], config=CFG)
    assert a.unique("step") == [1, 2] and len(a.unique("matrix")) == 14 and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[:-1] == y[:-1] and _same(x.value, y.value), (x, y)


def test_trainer_checkpoint_holding_only_a_zero_checkpoint(saved, tmp_path):
    """A Trainer under ZeRO-3 without 16-bit weights saves checkpoint-N/{config.json, latest, global_stepN/}."""
    ckpt = tmp_path / "trainer" / "checkpoint-2"
    shutil.copytree(saved / "zero3" / "global_step2", ckpt / "global_step2")
    shutil.copy(saved / "zero3" / "latest", ckpt / "latest")
    shutil.copy(saved / "hf3" / "checkpoint-2" / "config.json", ckpt / "config.json")
    a = analyze(str(saved / "base"), [str(tmp_path / "trainer")], config=CFG)
    b = analyze(str(saved / "base"), [str(saved / "hf3" / "checkpoint-2")], config=CFG)
    assert a.unique("step") == [2] and [x[:-1] for x in a] == [y[:-1] for y in b]
    assert all(_same(x.value, y.value) for x, y in zip(a, b, strict=True))


def test_refused_in_one_line_without_the_opt_in_or_deepspeed(saved, monkeypatch):
    with pytest.raises(GeometryError, match="global_step1: DeepSpeed ZeRO checkpoints are pickles.*--allow-pickle"
                       ) as err:
        open_run(saved / "zero3")
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)  # as if DeepSpeed were not installed
    with pytest.raises(GeometryError, match=r"needs DeepSpeed: pip install geometry\[deepspeed\]") as err:
        open_run(saved / "zero3", allow_pickle=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_bad_zero_checkpoints_fail_in_one_line(saved, tmp_path, stage):
    def refused(match):
        with pytest.raises(GeometryError, match=match) as err:
            analyze(str(saved / "base"), [str(tmp_path / "run")], config=CFG)
        assert "\n" not in str(err.value), err.value

    step = tmp_path / "run" / "global_step1"
    shutil.copytree(saved / f"zero{stage}" / "global_step1", step)
    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    refused("global_step1: not a readable DeepSpeed ZeRO checkpoint")
    optim.unlink()
    refused(r"global_step1: not a readable DeepSpeed ZeRO checkpoint \(Expected 2 of '\*_optim_states.pt'")
    for f in step.glob("*_model_states.pt"):
        f.unlink()
    refused("global_step1: a DeepSpeed checkpoint folder without model states")
