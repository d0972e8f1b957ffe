"""verl FSDP checkpoints (geometry.offline.verl) written for real: two CPU processes (gloo) train a tiny Qwen2
under FSDP2 ``fully_shard`` and save each step as verl does (``global_step_N/actor/model_world_size_2_rank_R.pt``
holding each rank's ``model.state_dict()`` of DTensors, ``actor/huggingface/config.json``); rank 0 saves the same
weights, gathered, as HF folders. Sizes are odd (45 MLP rows, 65 vocabulary rows) so the shards are uneven. A last
step is saved from ``distribute_tensor`` with other placements (``Shard(1)``, ``Replicate``) in bfloat16. Checked:
every tensor read back bit for bit, the same tidy table as the HF folders, and bad input refused in one line."""

import math
import shutil
import textwrap

import pytest
import torch
import workers

from geometry import AnalysisConfig, analyze
from geometry.cli import main
from geometry.errors import GeometryError
from geometry.offline.sources import open_run

WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=65, hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = Qwen2ForCausalLM(cfg)
    if rank == 0:
        model.save_pretrained(out / "base")

    def save(step, sd):  # as verl's FSDP checkpoint manager does, and the same weights gathered as an HF folder
        actor = out / "verl" / f"global_step_{step}" / "actor"
        if rank == 0:
            (actor / "huggingface").mkdir(parents=True)
            cfg.save_pretrained(actor / "huggingface")
        dist.barrier()
        torch.save(sd, actor / f"model_world_size_{world}_rank_{rank}.pt")
        full = {n: t.full_tensor() for n, t in sd.items()}
        if rank == 0:
            hf = out / "hf" / f"checkpoint-{step}"
            hf.mkdir(parents=True)
            save_file({n: t.contiguous() for n, t in full.items()}, str(hf / "model.safetensors"))
            cfg.save_pretrained(hf)
        return full

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in (1, 2):
        x = torch.randint(0, 65, (4, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sd = model.state_dict()
        print(f"rank {rank}: {type(sd['model.layers.0.mlp.gate_proj.weight']).__name__} "
              f"{tuple(sd['model.layers.0.mlp.gate_proj.weight'].to_local().shape)}", flush=True)
        full = save(step, sd)
    # step 3: other placements, bfloat16: matrices split by columns, vectors replicated
    sd = {n: distribute_tensor((t + 1e-2 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3))).bfloat16(),
                               mesh, [Shard(1) if t.dim() == 2 else Replicate()]) for n, t in full.items()}
    save(3, sd)
    dist.barrier()
    print(f"rank {rank}: done", flush=True)
    dist.destroy_process_group()
""")

CFG = AnalysisConfig(device="cpu", threads=1, lock_k=2, allow_pickle=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl")
    script = out / "worker.py"
    script.write_text(WORKER)
    logs = workers.launch(script, [str(out)], timeout=240, what="FSDP2 workers")
    assert "rank 0: DTensor (23, 32)" in logs[0] and "rank 1: DTensor (22, 32)" in logs[1]  # uneven shards
    return out


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_shards_read_back_bit_for_bit(saved):
    import torch.distributed.tensor  # noqa: F401  (torch allows DTensor's classes process-wide from here on)

    allowed = set(torch.serialization.get_safe_globals())
    verl, hf = open_run(saved / "verl", allow_pickle=True), open_run(saved / "hf")
    assert set(torch.serialization.get_safe_globals()) == allowed  # the reader's allowance ends with each load
    assert [(c.step, c.label) for c in verl] == [(1, "global_step_1"), (2, "global_step_2"), (3, "global_step_3")]
    for v, h in zip(verl, hf, strict=True):
        assert v.source.names() == h.source.names() and len(v.source.names()) == 27
        assert v.source.config["intermediate_size"] == 45  # from actor/huggingface/config.json
        for name in h.source.names():
            want = h.source.read(name)
            assert v.source.shape(name) == tuple(want.shape) and v.source.dtype(name) == want.dtype
            assert torch.equal(v.source.read(name), want), (v.step, name)
            if want.dim() == 2:  # a band of rows: across the shard boundary (row 23), inside one, empty
                for rows in (slice(20, 30), slice(0, 5), slice(30, 30)):
                    assert torch.equal(v.source.read(name, rows), want[rows]), (v.step, name, rows)
    one = open_run(saved / "verl" / "global_step_2" / "actor", allow_pickle=True)  # one step, named by its folder
    assert [(c.step, c.label) for c in one] == [(2, "global_step_2")]


def test_analysis_of_the_shards_is_the_analysis_of_the_hf_folders(saved):
    a = analyze(str(saved / "base"), [str(saved / "verl")], config=CFG)
    b = analyze(str(saved / "base"), [str(saved / "hf")], config=CFG)
    assert a.unique("step") == [1, 2, 3] and len(a) == len(b) > 0
    assert len(a.unique("matrix")) == 14  # 7 matrices a layer
    for x, y in zip(a, b, strict=True):
        assert x[:-1] == y[:-1] and _same(x.value, y.value), (x, y)


def test_pickles_refused_without_the_flag_in_one_line(saved, capsys):
    with pytest.raises(GeometryError, match="--allow-pickle") as err:
        open_run(saved / "verl")
    assert "\n" not in str(err.value)
    code = main(["analyze", str(saved / "base"), str(saved / "verl"), "-o", str(saved / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--allow-pickle" in err and len(err.splitlines()) == 1
    assert not (saved / "out").exists()


def _copy(saved, tmp_path, step=1):
    d = tmp_path / "run" / f"global_step_{step}"
    shutil.copytree(saved / "verl" / f"global_step_{step}", d)
    return d / "actor"


def _load(path):
    import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights_only loads)

    return torch.load(path, weights_only=True)


def test_bad_shards_fail_in_one_line(saved, tmp_path):
    def refused(match):
        with pytest.raises(GeometryError, match=match) as err:
            analyze(str(saved / "base"), [str(tmp_path / "run")], config=CFG)
        assert "\n" not in str(err.value), err.value

    actor = _copy(saved, tmp_path)
    rank1 = actor / "model_world_size_2_rank_1.pt"
    data = rank1.read_bytes()
    rank1.write_bytes(data[: len(data) // 2])  # truncated
    refused("model_world_size_2_rank_1.pt: not a readable verl shard")
    rank1.unlink()  # missing
    refused(r"world size 2, but model_world_size_2_rank_1.pt is missing \(1 of 2")
    sd = _load(actor / "model_world_size_2_rank_0.pt")
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, rank1)  # a shard lacking a tensor (and rank 0's data under rank 1's name)
    refused("model_world_size_2_rank_1.pt: lacks tensor model.layers.1.mlp.up_proj.weight, which rank 0's")
    shutil.copy(actor / "model_world_size_2_rank_0.pt", rank1)  # every tensor, but two copies of rank 0's shard
    refused("sharded over a mesh of 2 ranks .* holding 1 distinct shards")
    shutil.copy(saved / "verl" / "global_step_1" / "actor" / rank1.name, rank1)
    for r in range(3):  # the names say world size 3: the files are rank 0 and 1 of a 2-rank mesh, and a stray
        shutil.copy(actor / f"model_world_size_2_rank_{min(r, 1)}.pt", actor / f"model_world_size_3_rank_{r}.pt")
    refused("world sizes \\[2, 3\\] side by side")
    for r in range(2):
        (actor / f"model_world_size_2_rank_{r}.pt").unlink()
    refused("sharded over a mesh of 2 ranks \\(2,\\), but the files are a world of 3")
    shutil.rmtree(actor)
    refused("global_step_1: a verl checkpoint folder without actor shards")


def test_a_hostile_pickle_is_not_run(saved, tmp_path):
    actor = _copy(saved, tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    torch.save({"x": Evil()}, actor / "model_world_size_2_rank_1.pt")
    with pytest.raises(GeometryError, match="rank_1.pt: not a readable verl shard") as err:
        analyze(str(saved / "base"), [str(tmp_path / "run")], config=CFG)
    assert "\n" not in str(err.value) and not marker.exists()
