"""Long runs: how quickly a geometry store of many tracked steps opens and lists (issue 13 item 4).

Builds a synthetic store of ``--steps`` tracked steps (two small matrices, K=16) in the layout a Recorder
leaves: version 3, step files merged into chunks of CHUNK_STEPS (geometry.capture.store), the last few steps
in files of their own; with ``--compare``, also the version-2 layout, one file per step. Then times, each
the best of ``--repeats``:
- read_manifest: parse and check the manifest (it lists every step);
- check_store: what every reader does first (manifest, every listed file present, the base's hash);
- Store.open (resume): what a resumed run does (the above, adopting landed files, cleaning up);
- read_tracking (last step): what a resumed run's warm start reads;
- iter_tracking (all steps): every step's state read back, as the tracking table does (``--read-all``).

    python benchmarks/bench_store.py                   # 100k steps, version 3
    python benchmarks/bench_store.py --compare         # and the same steps as version 2's 100k files
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from geometry.capture.layout import save_folder
from geometry.capture.manifest import MANIFEST, Manifest, fingerprint
from geometry.capture.store import CHUNK_STEPS, Store, check_store, iter_tracking, read_manifest, read_tracking
from geometry.capture.trackfile import chunk_path, encode, join, tracking_path
from geometry.capture.tracking import Estimate

SETTINGS = {"track_every": 1, "snapshot_every": 0}
SHAPES = {"layers.0.q_proj.weight": (64, 64), "layers.0.up_proj.weight": (128, 64)}


def records(step: int, k: int = 16) -> dict[str, Estimate]:
    g = torch.Generator().manual_seed(step)
    return {n: Estimate(torch.randn(m, k, generator=g), torch.linspace(2, 1, k), torch.randn(n_, k, generator=g),
                        float(step), 1, 1e-3, False) for n, (m, n_) in SHAPES.items()}


def build(root: Path, steps: int, chunk: int) -> None:
    """A store of ``steps`` tracked steps: chunk files of ``chunk`` steps (0: a file per step, version 2)."""
    base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    root.mkdir(parents=True)
    save_folder(base, root / "base", None)
    (root / "tracking").mkdir()
    encoded = encode(records(1), torch.float16)  # the same state at every step: the layout is what is timed
    man = Manifest("base", *fingerprint(base), SETTINGS, version=3 if chunk else 2)
    man.tracking_steps = list(range(1, steps + 1))
    loose_from = steps - steps % chunk + 1 if chunk else 1
    if chunk:
        for first in range(1, loose_from, chunk):
            last = first + chunk - 1
            tensors, metadata = join({t: ({k: x.clone() for k, x in encoded[0].items()}, encoded[1])
                                      for t in range(first, last + 1)})
            save_file(tensors, chunk_path(root, (first, last)), metadata={"format": "pt", **metadata})
            man.add_chunk((first, last))
    for t in range(loose_from, steps + 1):
        save_file(encoded[0], tracking_path(root, t), metadata={"format": "pt", **encoded[1]})
    (root / MANIFEST).write_bytes(man.to_json())


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(root: Path, repeats: int, read_all: bool) -> dict[str, float]:
    last = read_manifest(root).tracking_steps[-1]
    out = {
        "read_manifest": best(lambda: read_manifest(root), repeats),
        "check_store": best(lambda: check_store(root), repeats),
        "Store.open (resume)": best(lambda: Store.open(root, None, settings=SETTINGS).close(), repeats),
        "read_tracking (last step)": best(lambda: read_tracking(root, last), repeats),
    }
    if read_all:
        out["iter_tracking (all steps)"] = best(lambda: sum(1 for _ in iter_tracking(root, read_manifest(root))), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=CHUNK_STEPS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also version 2: one file per step")
    ap.add_argument("--read-all", action="store_true", help="also read every step's state back")
    a = ap.parse_args()
    layouts = [("version 3", a.chunk)] + ([("version 2", 0)] if a.compare else [])
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, chunk in layouts:
            root = Path(tmp) / label.replace(" ", "")
            t0 = time.perf_counter()
            build(root, a.steps, chunk)
            files = len(list((root / "tracking").iterdir()))
            print(f"{label}: {a.steps} steps in {files} tracking files, manifest "
                  f"{(root / MANIFEST).stat().st_size / 2**10:.0f} KiB (built in {time.perf_counter() - t0:.0f} s)")
            results[label] = measure(root, a.repeats, a.read_all)
            shutil.rmtree(root)
        print(f"\n{'operation':28}" + "".join(f"{label:>12}" for label in results))
        for op in next(iter(results.values())):
            print(f"{op:28}" + "".join(f"{r[op] * 1e3:10.1f}ms" for r in results.values()))
        print(json.dumps({label: {op: round(v, 4) for op, v in r.items()} for label, r in results.items()}))


if __name__ == "__main__":
    main()
