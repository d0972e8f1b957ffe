"""Offline analysis under torchrun (gloo, CPU): the groups split by cost, the same table as one process,
the work split rather than repeated, and a failing rank ending the job in one line with no outputs."""

import math
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from geometry.offline.distributed import assign, group_cost
from geometry.offline.engine import group_size

SHAPES = {"q_proj": (96, 96), "k_proj": (24, 96), "o_proj": (96, 96), "up_proj": (264, 96), "down_proj": (96, 264)}


def _series(root, layers=2, steps=(10, 20), nan_at=None):
    """A base and two checkpoints; ``nan_at`` = (step, name): a NaN planted in that tensor."""
    g = torch.Generator().manual_seed(0)
    block = {m: "mlp" if m in ("up_proj", "down_proj") else "self_attn" for m in SHAPES}
    base = {f"model.layers.{i}.{block[m]}.{m}.weight": torch.randn(*shape, generator=g) / math.sqrt(shape[1])
            for i in range(layers) for m, shape in SHAPES.items()}
    (root / "base").mkdir()
    save_file(base, str(root / "base" / "model.safetensors"))
    for step in steps:
        ck = {k: W + 1e-2 * step / 10 * torch.randn(*W.shape, generator=g) for k, W in base.items()}
        if nan_at and nan_at[0] == step:
            ck[nan_at[1]][0, 0] = math.nan
        (root / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(ck, str(root / "run" / f"checkpoint-{step}" / "model.safetensors"))
    return root / "base", root / "run"


def _torchrun(nproc, base, run, out, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "geometry", "analyze", str(base), str(run), "-o", str(out), "--no-figures", "--no-progress",
           "--memory-mb", "0.3"]  # a small budget: several groups per shape, more groups than ranks
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_assign_balances_cost_not_count():
    # one big group and four small ones: by count 2 ranks would get 3 and 2 groups; by cost the big one alone
    costs = [group_cost((4096, 4096), 1)] + [group_cost((64, 64), 8)] * 4
    owner = assign(costs, 2)
    assert owner[0] != owner[1] and len({owner[i] for i in range(1, 5)}) == 1
    assert assign(costs, 2) == owner  # the same on every rank
    assert sorted(set(assign([1.0] * 7, 3))) == [0, 1, 2]


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_matches_one_process_and_splits_the_work(tmp_path, nproc):
    from geometry import AnalysisConfig, analyze
    from geometry.offline.outputs import write_analysis

    base, run = _series(tmp_path)
    torch.set_num_threads(1)
    t = time.process_time()
    single = analyze(str(base), [str(run)], config=AnalysisConfig(memory_mb=0.3))
    single_cpu = time.process_time() - t
    write_analysis(single, tmp_path / "single")
    res = _torchrun(nproc, base, run, tmp_path / "multi", tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("metrics.csv", "summary.json"):
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    # rank 0's line: "geometry: N ranks; groups and measuring CPU s per rank: g s, g s, ..."
    line = next(ln for ln in res.stderr.splitlines() if "ranks; groups" in ln)
    per_rank = [part.split() for part in line.split(": ")[-1].split(", ")]
    groups = [int(g) for g, _ in per_rank]
    cpu = [float(s) for _, s in per_rank]
    count = {shape: sum(s == shape for s in SHAPES.values()) * 2 for shape in SHAPES.values()}  # 2 layers
    n_groups = sum(math.ceil(c / group_size(shape, 0.3)) for shape, c in count.items())
    assert len(per_rank) == nproc and min(groups) >= 1 and sum(groups) == n_groups > nproc
    # split, not repeated: all ranks together near the single process (slack for per-call overheads)
    assert sum(cpu) < 1.5 * single_cpu + 0.5, (cpu, single_cpu)


def test_a_failing_rank_ends_the_job_in_one_line_without_outputs(tmp_path):
    base, run = _series(tmp_path, nan_at=(20, "model.layers.1.mlp.down_proj.weight"))
    res = _torchrun(2, base, run, tmp_path / "out", tmp_path)
    assert res.returncode != 0
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("geometry: error:")]
    assert len(ours) == 1 and "NaN/Inf" in ours[0] and "rank " in ours[0], res.stderr
    assert not (tmp_path / "out").exists()
