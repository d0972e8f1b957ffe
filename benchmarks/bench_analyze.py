"""Offline analyzer: the floor, ours, a naive research script and the peers, side by side in one run.

Builds a synthetic checkpoint series shaped like a small LLM (safetensors, HF names), then runs each
contender in a fresh process (OMP_WAIT_POLICY=PASSIVE for all) and prints one table: wall time, CPU time
(user + system: robust on a shared machine), peak RSS (the contender's own VmHWM), and the ratio to the floor.

- floor: read each matrix once, plus the spectra the full suite cannot do without: W0's once, then W_t's,
  D_t's and d_t's at every checkpoint (d_t only where it differs from D_t: at the first checkpoint it is
  D_t), as float64 Gram eigenvalues by the fastest kernels we know (geometry.kernels.gram and symeig.sym_eig:
  syrk and LAPACK), nothing else. The floor of the quick suite: D_t's spectrum alone;
- ours: ``geometry analyze`` (every SPEC metric, tables only), the whole process; ours-quick: ``--quick``
  (the update alone: sparsity, norms, rank metrics, locking; what the peers compute);
- naive: per matrix, float64 scipy full SVDs of W0 (again for every checkpoint), W_t, D and D_T, whole
  files loaded with load_file, as research scripts do; also the largest disagreement with ours;
- peers (optional, `pip install modeldelta weightwatcher afterburn`): each on base + final checkpoint,
  skipped with a line when not installed. What each computes is printed beside it.

    python benchmarks/bench_analyze.py                    # 8 layers, hidden 512, intermediate 1408, 5 ckpts
    python benchmarks/bench_analyze.py --size 90m --checkpoints 1     # the 90M Llama pair of issue 12
    python benchmarks/bench_analyze.py --size 90m --checkpoints 1 --repeat 3   # medians of 3 rounds
    python benchmarks/bench_analyze.py --size 8b-layer --checkpoints 1 --memory-mb 8192 --skip-naive
        # one Qwen3-8B-shaped layer (4096x4096, 1024x4096, 12288x4096, 4096x12288), extrapolated to a
        # 36-layer, 252-matrix checkpoint

Every contender runs with this process's environment: where the machine pins OpenBLAS's kernels
(OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) every one runs pinned, and the header says which kernels ran; to
measure what current numpy and scipy choose by themselves, unset both for the command alone
(`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_analyze.py ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# each contender's process imports what that contender needs and nothing more (its peak RSS is measured):
# torch, safetensors and scipy.linalg are imported where they are used

SIZES = {"small": (8, 512, 1408), "90m": (8, 1024, 2816), "8b-layer": (1, 4096, 12288), "tiny": (2, 128, 352)}
LAYERS_8B = 36  # Qwen3-8B: 36 layers x 7 matrices = 252
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
    import torch
    from safetensors.torch import save_file

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
    (root / "base" / "config.json").write_text(json.dumps(llama_config(layers, hidden, inter)))
    for i in range(1, n_ckpt + 1):
        f = i / n_ckpt
        ckpt = {k: (W + f * finals[k][0] + math.sqrt(f) * finals[k][1]).contiguous() for k, W in base.items()}
        d = root / "run" / f"checkpoint-{100 * i}"
        d.mkdir(parents=True)
        save_file(ckpt, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(llama_config(layers, hidden, inter)))


def llama_config(layers: int, hidden: int, inter: int) -> dict:
    """A Llama config.json for the series (peers read the architecture from it; ours reads hidden_size)."""
    heads = max(1, hidden // 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4), "vocab_size": 32000, "torch_dtype": "float32"}


def naive(root: Path, ckpts: list[Path], k_of) -> dict:
    """The research-script way: everything recomputed per matrix and checkpoint, scipy float64 full SVDs."""
    import numpy as np
    import scipy.linalg as sl
    from safetensors.torch import load_file

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


def floor(root: Path, ckpts: list[Path], memory_mb: float, quick: bool = False, device: str = "cpu",
          threads: int = 0) -> None:
    """Each matrix read once (by groups of one shape, as ours reads), and the spectra the suite cannot do
    without as float64 Gram eigenvalues by ours' kernels: W0 once, W_t, D_t and d_t (where it is not D_t) at
    each checkpoint; ``quick``: D_t only; on ``device``, as ours; on the CPU the groups on ``threads`` threads
    (0: a core each) with single-threaded kernels, as ours. Nothing else."""
    import torch

    from geometry.kernels import gram
    from geometry.offline import threads as th
    from geometry.offline.batches import batch_size
    from geometry.offline.sources import open_source
    from geometry.symeig import sym_eig

    base = open_source(root / "base")
    by_shape: dict[tuple[int, int], list[str]] = {}
    for key in base.names():
        by_shape.setdefault(tuple(base.shape(key)), []).append(key)
    sources = [open_source(c) for c in ckpts]
    sizes = {shape: batch_size(shape, memory_mb, torch.device(device)) for shape in by_shape}  # ours' batches
    groups = [keys[i:i + sizes[shape]] for shape, keys in by_shape.items() for i in range(0, len(keys), sizes[shape])]

    def measure(group: list[str]) -> None:
        W0 = torch.stack([base.read(k) for k in group]).to(device).double()
        if not quick:
            sym_eig(gram(W0))
        prev = W0
        for src in sources:
            Wt = torch.stack([src.read(k) for k in group]).to(device).double()
            spectra = [Wt - W0] if quick else [Wt, Wt - W0] + ([Wt - prev] if prev is not W0 else [])
            for x in spectra:
                sym_eig(gram(x))
            prev = Wt

    cpu = device == "cpu"  # as ours: a GPU takes one group at a time
    with th.kernels() if cpu else contextlib.nullcontext():
        th.ordered_map(measure, groups, (threads or th.cores()) if cpu else 1)


def ours(root: Path, ckpts: list[Path], device: str, memory_mb: float, out: Path, quick: bool = False,
         threads: int = 0) -> None:
    """The whole `geometry analyze` process, tables only (figures are a separate cost, off here)."""
    from geometry.cli import main as cli

    argv = ["analyze", str(root / "base"), *map(str, ckpts), "-o", str(out), "--no-figures", "--no-progress",
            "--device", device, "--memory-mb", str(memory_mb), "--threads", str(threads),
            *(["--quick"] if quick else [])]
    if cli(argv) != 0:
        raise SystemExit("geometry analyze failed")


# What each peer computes, as its documentation and output say (printed with the table).
PEERS = {
    "modeldelta": "per-tensor delta norms and relative change; SVD of the delta (top singular values, effective "
                  "rank); no angles, sparsity, masks or locking",
    "weightwatcher": "per-layer ESD of W_t (or of the delta, base_model mode): power-law alpha, spectral norm, "
                     "stable rank, MP soft rank; no angles, overlaps, masks or locking",
    "afterburn": "weight-diff: per-layer relative L2 change, cosine of W0 and W_t, top singular values of the "
                 "delta; no angles, masks or locking",
}


def peer(name: str, root: Path, ckpts: list[Path]) -> None:
    """One peer on base + final checkpoint, through its own Python API."""
    base, final = root / "base", ckpts[-1]
    if not (base / "config.json").exists():  # a series from before config.json was written: peers need one
        base, final = _with_config(base), _with_config(final)
    if name == "modeldelta":
        _peer_modeldelta(base, final)
    elif name == "weightwatcher":
        _peer_weightwatcher(base, final)
    elif name == "afterburn":
        _peer_afterburn(base, final)


def _with_config(d: Path) -> Path:
    """A copy of model dir d (the weights linked) with a config.json inferred from its shapes."""
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        hidden = f.get_slice(next(k for k in keys if "q_proj" in k)).get_shape()[0]
        inter = f.get_slice(next(k for k in keys if "up_proj" in k)).get_shape()[0]
    out = Path(tempfile.mkdtemp()) / d.name
    out.mkdir()
    (out / "model.safetensors").symlink_to(d / "model.safetensors")
    layers = len([k for k in keys if "q_proj" in k])
    (out / "config.json").write_text(json.dumps(llama_config(layers, hidden, inter)))
    return out


def _peer_modeldelta(base: Path, final: Path) -> None:
    from modeldelta.core.weight_diff import compare_models
    from modeldelta.utils.model_loader import get_tensor_map

    compare_models(get_tensor_map(str(base)), get_tensor_map(str(final)), top_k=20)


def _peer_weightwatcher(base: Path, final: Path) -> None:
    import torch
    import weightwatcher as ww
    from safetensors.torch import load_file

    def module(path: Path) -> torch.nn.Module:  # the Linear layers of the checkpoint, as WeightWatcher walks them
        mods = torch.nn.ModuleDict()
        for key, W in load_file(str(path / "model.safetensors")).items():
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            lin.weight.data = W
            mods[key.removesuffix(".weight").replace(".", "_")] = lin
        return mods

    ww.WeightWatcher(model=module(final), base_model=module(base)).analyze()


def _peer_afterburn(base: Path, final: Path) -> None:
    from afterburn.device import auto_detect_device
    from afterburn.types import ModelPair
    from afterburn.weight_diff.engine import WeightDiffEngine

    pair = ModelPair(base_model=str(base), trained_model=str(final))
    WeightDiffEngine(pair, auto_detect_device(force_device="cpu")).run()


def worker(args) -> None:
    """One contender, in this (fresh) process; the parent measures it. Its peak RSS is this process's own
    VmHWM, written to --rss-file: the kernel's ru_maxrss of a child also counts the parent's resident memory
    at fork/exec (the parent holds the series it built), which would give every contender the same floor."""
    try:
        _contend(args)
    finally:
        if args.rss_file:
            status = Path("/proc/self/status").read_text()
            hwm = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
            Path(args.rss_file).write_text(hwm)  # kB


def _contend(args) -> None:
    root = Path(args.root)
    ckpts = [Path(c) for c in json.loads(args.ckpts)]
    if args.worker in ("floor", "floor-quick"):
        floor(root, ckpts, args.memory_mb, quick=args.worker == "floor-quick", device=args.device,
              threads=args.threads)
    elif args.worker in ("ours", "ours-quick"):
        ours(root, ckpts, args.device, args.memory_mb, Path(args.out), quick=args.worker == "ours-quick",
             threads=args.threads)
    elif args.worker == "naive":
        from geometry.offline.config import AnalysisConfig

        def k_of(m: int, n: int) -> int:
            return AnalysisConfig().principal_size((m, n), hidden)  # k from config.json's hidden size, as ours

        config = root / "base" / "config.json"
        hidden = json.loads(config.read_text())["hidden_size"] if config.exists() else None

        ref = naive(root, ckpts, k_of)
        Path(args.out).write_text(json.dumps([[*key, value] for key, value in ref.items()]))
    else:
        peer(args.worker, root, ckpts)
        from importlib.metadata import version

        Path(args.out).write_text(f"{args.worker} {version(args.worker)}, torch {version('torch')}")


def measure(name: str, root: Path, ckpts: list[Path], args, out: Path | None = None, *, label: str | None = None,
            pythonpath: str | None = None, python: str = sys.executable) -> dict:
    """Run one contender in a fresh process: wall, CPU (user + system) and peak RSS, from wait4."""
    scratch = Path(tempfile.mkdtemp())
    rss_file, log = scratch / "rss", scratch / "log"
    out = out or scratch / "out"  # a peer writes its version there
    cmd = [python, __file__, "--worker", name, "--root", str(root),
           "--ckpts", json.dumps(list(map(str, ckpts))), "--rss-file", str(rss_file),
           "--device", args.device, "--memory-mb", str(args.memory_mb), "--threads", str(args.threads),
           "--out", str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if args.threads:  # the same thread count for every contender's BLAS/LAPACK (MKL, OpenBLAS, OpenMP)
        env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    if pythonpath:  # another checkout's geometry package, e.g. the commit before a change
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    t = time.perf_counter()
    with log.open("w") as sink:  # a file, not a pipe: a chatty peer cannot fill a pipe nobody reads
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    rss_mb = int(rss_file.read_text()) / 1024 if rss_file.exists() else float("nan")
    fig = {"name": label or name, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "sys_s": usage.ru_stime,
           "rss_mb": rss_mb, "ok": code == 0}
    if not fig["ok"]:
        lines = [ln for ln in log.read_text(errors="replace").strip().splitlines() if ln.strip()]
        fig["why"] = lines[-1] if lines else f"exit {code}"
    elif name in PEERS:  # the peers change between releases: the figures say which one ran
        fig["version"] = out.read_text()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-mb", type=float, default=2048.0, help="ours' --memory-mb (and the floor's grouping)")
    ap.add_argument("--threads", type=int, default=0, help="threads of every contender: BLAS/OpenMP threads of the "
                    "peers and the naive script, measuring threads of ours and the floor (default: each one's own "
                    "choice, a core each for ours; 1 is the fair setting on a shared machine, where idle threads spin)")
    ap.add_argument("--skip-naive", action="store_true", help="for sizes where the naive pipeline takes hours")
    ap.add_argument("--peers", default="modeldelta,weightwatcher,afterburn", help="comma list; '' for none")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="the interpreter that has the peers installed (e.g. a venv's bin/python)")
    ap.add_argument("--compare-with", metavar="DIR", help="also time ours with the geometry package under DIR "
                    "(e.g. `git archive HEAD geometry | tar -x -C DIR`), side by side")
    ap.add_argument("--root", help="an existing series (from an earlier --keep) instead of building one")
    ap.add_argument("--keep", help="build the series here and keep it")
    ap.add_argument("--repeat", type=int, default=1, help="measure every contender this many times, in rounds, "
                    "and report the median times (with their range) and the largest peak RSS")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpts", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--rss-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    layers, hidden, inter = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or args.keep or tmp)
        if not args.root:
            build_series(root, layers, hidden, inter, args.checkpoints)
        ckpts = sorted((root / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        fig = {"size": args.size, "layers": layers, "hidden": hidden, "intermediate": inter, "threads": args.threads,
               "checkpoints": len(ckpts), "device": args.device, "memory_mb": args.memory_mb,
               "load_before": os.getloadavg(), "cpus": os.cpu_count(), "kernels": kernels(), "rows": []}
        pair = ckpts[-1:]  # the peers compare two models: ours on the same pair too, for a like-for-like row
        plan = [("floor", ckpts, {}), ("ours", ckpts, {"out": Path(tmp) / "ours-out"}), ("floor-quick", ckpts, {}),
                ("ours-quick", ckpts, {"out": Path(tmp) / "quick-out"})]
        if args.compare_with:
            plan.append(("ours", ckpts, {"out": Path(tmp) / "before-out", "label": "ours-before",
                                         "pythonpath": args.compare_with}))
        if not args.skip_naive:
            plan.append(("naive", ckpts, {"out": Path(tmp) / "naive.json"}))
        peers = list(filter(None, args.peers.split(",")))
        if peers:
            plan += [("ours", pair, {"out": Path(tmp) / "pair-out", "label": "ours-pair"}),
                     ("ours-quick", pair, {"out": Path(tmp) / "pair-quick-out", "label": "ours-quick-pair"})]
        plan += [(name, pair, {"python": args.peer_python}) for name in peers]
        runs: list[list[dict]] = [[] for _ in plan]
        for _ in range(args.repeat):  # in rounds: a drift of the machine's speed meets every contender alike
            for (name, series, kw), got in zip(plan, runs, strict=True):
                got.append(measure(name, root, series, args, **kw))
        fig["repeat"] = args.repeat
        fig["rows"] = [_median(got) for got in runs]
        names = [r["name"] for r in fig["rows"]]
        if "naive" in names and fig["rows"][names.index("ours")]["ok"] and fig["rows"][names.index("naive")]["ok"]:
            fig["max_rel_err"] = max_disagreement(Path(tmp) / "ours-out" / "metrics.csv", Path(tmp) / "naive.json")
        fig["load_after"] = os.getloadavg()
    report(fig)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))


def kernels() -> str:
    """The kernels the contenders' OpenBLAS runs (numpy's and scipy's, as threadpoolctl reports them), and the
    variables that chose them: a machine may pin older kernels for every process (OPENBLAS_CORETYPE), which
    slows the BLAS-bound contenders most (measured, the 90M pair on two cores: ours 12.3 s wall pinned to
    Haswell's AVX2 kernels, 9.8 s with OpenBLAS's own choice on the same AVX-512 CPU; WeightWatcher 11.2
    and 13.1 s)."""
    probe = ("import numpy, scipy.linalg, threadpoolctl; print(' '.join(sorted({d['architecture'] for d in "
             "threadpoolctl.threadpool_info() if d['internal_api'] == 'openblas'})))")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    pins = [f"{v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    return f"{got.stdout.strip() or '?'} ({', '.join(pins) if pins else 'its own choice'})"


def _median(runs: list[dict]) -> dict:
    """One contender's row from its runs: median wall, CPU and system time, their range, the largest peak RSS."""
    ok = [r for r in runs if r["ok"]]
    if len(ok) < len(runs):
        return next(r for r in runs if not r["ok"])
    row = dict(ok[0])
    for key in ("wall_s", "cpu_s", "sys_s"):
        values = [r[key] for r in ok]
        row[key], row[key + "_range"] = statistics.median(values), (min(values), max(values))
    row["rss_mb"] = max(r["rss_mb"] for r in ok)
    return row


def max_disagreement(ours_csv: Path, naive_json: Path) -> dict:
    """Largest relative difference, per metric, between ours and the naive pipeline."""
    from geometry.table import Table

    mine = {(f"checkpoint-{r.step}", r.matrix, r.metric): r.value for r in Table.from_csv(ours_csv)}
    errs: dict[str, float] = {}
    for ck, matrix, metric, want in json.loads(naive_json.read_text()):
        rel = abs(mine[(ck, matrix, metric)] - want) / max(abs(want), 1e-300)
        errs[metric] = max(errs.get(metric, 0.0), rel)
    return errs


def report(fig: dict) -> None:
    print(f"series: {fig['layers']} layers x 7 matrices, hidden {fig['hidden']}, intermediate {fig['intermediate']}, "
          f"{fig['checkpoints']} checkpoints, device {fig['device']}, --memory-mb {fig['memory_mb']:.0f}, "
          f"threads {fig['threads'] or 'default'}; "
          f"{fig['cpus']} CPUs, load average {fig['load_before'][0]:.1f} before, {fig['load_after'][0]:.1f} after; "
          f"OpenBLAS kernels {fig.get('kernels', '?')}"
          + (f"; times: the median of {fig['repeat']} rounds [wall range], peak RSS the largest"
             if fig.get("repeat", 1) > 1 else ""))
    rows = {r["name"]: r for r in fig["rows"]}
    print(f"  {'contender':<16} {'wall s':>8} {'CPU s':>8} {'sys s':>7} {'peak RSS MB':>12} {'CPU/floor':>10}"
          "  computes  (quick rows against floor-quick)")
    what = {"floor": "read once + float64 Gram spectra of W0 (once), W_t, D_t, d_t (where not D_t)",
            "ours": "every SPEC metric (1-8), all checkpoints", "ours-before": "the same, --compare-with's code",
            "floor-quick": "read once + the float64 Gram spectrum of D_t",
            "ours-quick": "--quick: sparsity, norms, rank metrics, locking of D_t, all checkpoints",
            "ours-pair": "every SPEC metric, base + final checkpoint only (the peers' input)",
            "ours-quick-pair": "--quick, base + final checkpoint only",
            "naive": "5 metrics by scipy full SVDs, all checkpoints",
            **{k: f"{v} (base + final checkpoint only)" for k, v in PEERS.items()}}
    for r in fig["rows"]:
        if not r["ok"]:
            print(f"  {r['name']:<16} skipped: {r['why']}")
            continue
        fl = rows["floor-quick" if "quick" in r["name"] else "floor"]
        ratio = r["cpu_s"] / fl["cpu_s"] if fl["ok"] else math.nan
        spread = f"[{r['wall_s_range'][0]:.1f}-{r['wall_s_range'][1]:.1f}] " if fig.get("repeat", 1) > 1 else ""
        print(f"  {r['name']:<16} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['sys_s']:7.1f} {r['rss_mb']:12.0f} "
              f"{ratio:10.2f}  {spread}{r['version'] + ': ' if 'version' in r else ''}{what.get(r['name'], '')}")
    if "max_rel_err" in fig:
        print("  ours vs naive, max relative disagreement: "
              + ", ".join(f"{k} {v:.1e}" for k, v in fig["max_rel_err"].items()))
    if fig["size"] == "8b-layer" and rows["ours"]["ok"]:
        per = rows["ours"]["cpu_s"], rows["ours"]["wall_s"]
        print(f"  extrapolation to a whole 8B checkpoint ({LAYERS_8B} layers, {7 * LAYERS_8B} matrices), base "
              f"decomposition included, {fig['checkpoints']} checkpoint(s): ~{LAYERS_8B * per[0] / 60:.0f} CPU min, "
              f"~{LAYERS_8B * per[1] / 60:.0f} min wall at this load; peak RSS stays one group's "
              f"({rows['ours']['rss_mb']:.0f} MB), not the checkpoint's")


if __name__ == "__main__":
    main()
