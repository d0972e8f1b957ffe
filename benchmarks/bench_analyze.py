"""Offline analyzer: ours vs a naive research-script pipeline, side by side in one run.

Builds a synthetic checkpoint series shaped like a small LLM (safetensors, HF names), then prints:
- time of our full suite (geometry.analyze, all SPEC metrics);
- time of a naive pipeline: per matrix, float64 scipy full SVDs of W0 (again for every checkpoint),
  W_t and D, whole files loaded with load_file, as research scripts do;
- time merely to read every checkpoint's matrices;
- the largest disagreement between the two on shared metrics;
- peak RSS of our analysis with 2 and with 10 checkpoints (fresh subprocesses).

    python benchmarks/bench_analyze.py                    # 8 layers, hidden 512, intermediate 1408, 5 ckpts
    python benchmarks/bench_analyze.py --size 8b-layer    # one layer of an 8B model (GPU recommended)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg as sl
import torch
from safetensors.torch import load_file, save_file

SIZES = {"small": (8, 512, 1408), "8b-layer": (1, 4096, 12288), "tiny": (2, 128, 352)}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    kv = hidden // 4  # grouped-query attention, 4 query heads per kv head
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def name(layer: int, module: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{module}.weight"


def build_series(root: Path, layers: int, hidden: int, inter: int, n_ckpt: int, seed: int = 0) -> None:
    """Base with a decaying spectrum; updates D_t = (t/T) L + sqrt(t/T) N: a low-rank drift plus dense noise."""
    g = torch.Generator().manual_seed(seed)
    base, finals = {}, {}
    for layer in range(layers):
        for module, (m, n) in shapes(hidden, inter).items():
            W = torch.randn(m, n, generator=g) / math.sqrt(n)
            W *= torch.linspace(1.5, 0.5, n)  # uneven column scales: an uneven spectrum, like trained weights
            base[name(layer, module)] = W
            low = torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g) * 2e-4
            finals[name(layer, module)] = (low, torch.randn(m, n, generator=g) * 3e-4)
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for i in range(1, n_ckpt + 1):
        f = i / n_ckpt
        ckpt = {k: (W + f * finals[k][0] + math.sqrt(f) * finals[k][1]).contiguous() for k, W in base.items()}
        d = root / "run" / f"checkpoint-{100 * i}"
        d.mkdir(parents=True)
        save_file(ckpt, str(d / "model.safetensors"))


def naive(root: Path, ckpts: list[Path], k_of) -> dict:
    """The research-script way: everything recomputed per matrix and checkpoint, scipy float64 full SVDs."""
    out = {}
    final = load_file(str(ckpts[-1] / "model.safetensors"))
    for ck in ckpts:
        base = load_file(str(root / "base" / "model.safetensors"))
        cur = load_file(str(ck / "model.safetensors"))
        for key, W0 in base.items():
            w0, wt = W0.double().numpy(), cur[key].double().numpy()
            d = wt - w0
            U0, s0, V0h = sl.svd(w0)
            Ut, st, Vth = sl.svd(wt)
            Ud, sd, Vdh = sl.svd(d)
            UT, sT, VTh = sl.svd(final[key].double().numpy() - w0)
            k = k_of(*w0.shape)
            out[(ck.name, key, "angle_max_u")] = math.degrees(sl.subspace_angles(U0[:, :k], Ut[:, :k]).max())
            out[(ck.name, key, "nss")] = np.linalg.norm(st - s0) / np.linalg.norm(s0)
            out[(ck.name, key, "overlap_2s")] = np.sum((U0[:, :k].T @ d @ V0h[:k].T) ** 2) / np.sum(d**2)
            out[(ck.name, key, "stable_rank")] = np.sum(sd**2) / sd[0] ** 2
            out[(ck.name, key, "sim_final_v")] = np.sum((Vdh[:16] @ VTh[:16].T) ** 2) / 16
    return out


def read_only(root: Path, ckpts: list[Path]) -> None:
    from geometry.offline.sources import open_source

    for ck in [root / "base"] + ckpts:
        src = open_source(ck)
        for n in src.names():
            src.read(n).sum()  # touch the data: a lazy read is not a read


def ours(root: Path, ckpts: list[Path], device: str):
    from geometry import AnalysisConfig, analyze

    return analyze(str(root / "base"), [str(c) for c in ckpts], label="bench", config=AnalysisConfig(device=device))


def peak_rss_mb(root: Path, n: int, device: str) -> float:
    """Peak RSS of a fresh process that analyzes the first n checkpoints."""
    code = (
        "import sys, resource, pathlib; from geometry import analyze, AnalysisConfig; "
        f"r = pathlib.Path({str(root)!r}); cks = sorted((r / 'run').glob('checkpoint-*'), "
        "key=lambda p: int(p.name.split('-')[1]))"
        f"[:{n}]; analyze(str(r / 'base'), [str(c) for c in cks], config=AnalysisConfig(device={device!r})); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def timed(fn, *args):
    t = time.perf_counter()
    res = fn(*args)
    return res, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-naive", action="store_true", help="for sizes where the naive pipeline takes hours")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    layers, hidden, inter = SIZES[args.size]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_series = max(args.checkpoints, 10)
        build_series(root, layers, hidden, inter, n_series)
        all_ckpts = sorted((root / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        # an evenly spaced subset of `checkpoints` of them, ending at the final one
        ckpts = [all_ckpts[round((i + 1) * n_series / args.checkpoints) - 1] for i in range(args.checkpoints)]
        fig = {"size": args.size, "layers": layers, "hidden": hidden, "intermediate": inter,
               "checkpoints": len(ckpts), "device": args.device, "torch_threads": torch.get_num_threads()}
        _, fig["read_s"] = timed(read_only, root, ckpts)
        table, fig["ours_s"] = timed(ours, root, ckpts, args.device)
        if not args.skip_naive:
            from geometry.offline.config import AnalysisConfig

            def k_of(m: int, n: int) -> int:
                return AnalysisConfig().principal_size((m, n), None)  # the series has no config.json, as ours sees

            ref, fig["naive_s"] = timed(naive, root, ckpts, k_of)
            fig["speedup"] = fig["naive_s"] / fig["ours_s"]
            fig["max_rel_err"] = max_disagreement(table, ref)
        fig["rss_2_mb"] = peak_rss_mb(root, 2, args.device)
        fig["rss_10_mb"] = peak_rss_mb(root, 10, args.device)
        fig["rss_growth"] = fig["rss_10_mb"] / fig["rss_2_mb"] - 1
    report(fig)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))


def max_disagreement(table, ref: dict) -> dict:
    """Largest relative difference, per metric, between ours and the naive pipeline."""
    errs: dict[str, float] = {}
    mine = {(f"checkpoint-{r.step}", r.matrix, r.metric): r.value for r in table}
    for key, want in ref.items():
        got = mine[key]
        rel = abs(got - want) / max(abs(want), 1e-300)
        errs[key[2]] = max(errs.get(key[2], 0.0), rel)
    return errs


def report(fig: dict) -> None:
    print(f"series: {fig['layers']} layers x 7 matrices, hidden {fig['hidden']}, intermediate {fig['intermediate']}, "
          f"{fig['checkpoints']} checkpoints, device {fig['device']}, {fig['torch_threads']} threads")
    print(f"  read checkpoints only : {fig['read_s']:8.2f} s")
    print(f"  geometry (full suite) : {fig['ours_s']:8.2f} s")
    if "naive_s" in fig:
        print(f"  naive scipy pipeline  : {fig['naive_s']:8.2f} s   -> ours is {fig['speedup']:.1f}x faster")
        print("  max relative disagreement: " + ", ".join(f"{k} {v:.1e}" for k, v in fig["max_rel_err"].items()))
    print(f"  peak RSS: 2 checkpoints {fig['rss_2_mb']:.0f} MB, 10 checkpoints {fig['rss_10_mb']:.0f} MB "
          f"({100 * fig['rss_growth']:+.1f}%)")


if __name__ == "__main__":
    main()
