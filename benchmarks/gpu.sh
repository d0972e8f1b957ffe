#!/usr/bin/env bash
# The GPU check of issue 13, in one go, on a machine with one CUDA GPU (about 8 minutes on an H200):
#   1. the CUDA-marked tests (pytest -m cuda: the engine on CUDA against the CPU);
#   2. one Qwen3-8B-shaped layer (q/o 4096x4096, k/v 1024x4096, gate/up 12288x4096, down 4096x12288),
#      base + 1 checkpoint, by benchmarks/bench_analyze.py against its floor, extrapolated to a 36-layer,
#      252-matrix checkpoint (targets: <= 60 s for the checkpoint);
#   3. the recorder benchmark on CUDA at 8k tokens a step (target: tracking every step <= 1.02x step time);
# then one table. Every step runs even if one before it failed; the exit code is the first failure's.
#
#   bash benchmarks/gpu.sh                              # on the GPU machine
#   GEOMETRY_GPU_FALLBACK=cpu bash benchmarks/gpu.sh    # the same steps on the CPU at small sizes (no GPU:
#                                                       # checks the script, times nothing of interest)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export OMP_WAIT_POLICY=PASSIVE
if [ "${GEOMETRY_GPU_FALLBACK:-}" = cpu ]; then
    DEV=cpu SIZE=tiny MEM=2048
    REC=(--steps 24 --hidden 64 --layers 2 --batch 2 --seq 32 --vocab 256 --repeats 1)
else
    DEV=cuda SIZE=8b-layer MEM=16384
    REC=(--steps 120 --hidden 1024 --layers 4 --batch 8 --seq 1024 --repeats 1)  # 8 x 1024 = 8k tokens a step
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: torch sees no CUDA device (GEOMETRY_GPU_FALLBACK=cpu checks the script on the CPU)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
fi
status=0
step() {  # step NAME CMD...: run, keep its output and exit code, time it
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
    tail -n 3 "$OUT/$name.log" | sed "s/^/  [$name] /"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
: > "$OUT/steps.txt"
step tests "$PY" -m pytest -m cuda tests/test_cuda.py -o addopts= -q -p no:cacheprovider -rs
step layer "$PY" benchmarks/bench_analyze.py --size "$SIZE" --checkpoints 1 --device "$DEV" --memory-mb "$MEM" \
    --skip-naive --peers "" --json "$OUT/layer.json"
step recorder "$PY" benchmarks/bench_recorder.py --device "$DEV" "${REC[@]}"
"$PY" - "$OUT" "$DEV" <<'EOF'
import json, re, sys
from pathlib import Path

out, dev = Path(sys.argv[1]), sys.argv[2]
steps = {name: (int(rc), int(s)) for name, rc, s in (line.split() for line in (out / "steps.txt").read_text().splitlines())}
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "none (CPU fallback)"
rows = []
tests = (out / "tests.log").read_text()
summary = (re.findall(r"(\d+ (?:passed|failed|skipped|error)[^\n]*)", tests) or ["no summary"])[-1]
rows.append(("CUDA tests (pytest -m cuda)", summary.strip("= "), steps["tests"]))
if (out / "layer.json").exists():
    fig = json.loads((out / "layer.json").read_text())
    r = {row["name"]: row for row in fig["rows"]}
    ours, floor = r["ours"], r["floor"]
    layers = 36 if fig["size"] == "8b-layer" else None
    rows.append((f"one {fig['size']} layer, base + 1 ckpt: ours", f"{ours['wall_s']:.1f} s wall, "
                 f"{ours['rss_mb']:.0f} MB peak RSS, {ours['wall_s'] / floor['wall_s']:.2f}x the floor "
                 f"({floor['wall_s']:.1f} s)", steps["layer"]))
    if layers:
        rows.append(("8B checkpoint (252 matrices), extrapolated", f"~{layers * ours['wall_s']:.0f} s "
                     "(target <= 60 s on one H200)", steps["layer"]))
else:
    rows.append(("one layer", "failed: see layer.log", steps["layer"]))
rec = (out / "recorder.log").read_text()
for line in rec.splitlines():
    if re.match(r"(no callback|snapshots every|tracking every)", line):
        label = line[:34].strip()
        ratio = re.findall(r"([\d.]+)x", line)
        rows.append((f"recorder: {label}", f"median step {ratio[0] if ratio else '?'}x no callback "
                     "(target <= 1.02x for tracking every step)", steps["recorder"]))
if not any(r[0].startswith("recorder") for r in rows):
    rows.append(("recorder", "failed: see recorder.log", steps["recorder"]))
print(f"\ngeometry GPU check: device {dev}; GPU {gpu}; logs in {out}")
width = max(len(r[0]) for r in rows)
for name, text, (rc, secs) in rows:
    print(f"  {name:<{width}}  {'ok ' if rc == 0 else 'FAIL'} {secs:4d} s  {text}")
EOF
exit $status
