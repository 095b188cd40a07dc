#!/usr/bin/env bash
# Everything a GPU session should measure, in one call on the device machine:
#   selftest, per-kernel conv timings next to cuDNN, training throughput next to PyTorch.
# Usage (from the repository root, release binary carried along): benches/run_gpu.sh OUTDIR
set -uo pipefail
out=${1:-${OUT:-/tmp/rotvar-gpu}}
mkdir -p "$out"
bin=${ROTVAR:-target/release/rotvar}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
"$bin" info | tee "$out/info.txt"
"$bin" selftest --device cuda 2>&1 | tee "$out/selftest.txt"
echo "selftest exit: ${PIPESTATUS[0]}" | tee -a "$out/selftest.txt"
"$bin" bench conv --device cuda --steps 50 > "$out/conv_rotvar.jsonl" 2> "$out/conv_rotvar.err"
"$py" benches/torch_conv_reference.py --reps 50 > "$out/conv_cudnn.jsonl" 2> "$out/conv_cudnn.err"
for r in 1 2 3; do
  "$bin" bench train --device cuda --steps 50 >> "$out/train_rotvar.jsonl" 2>> "$out/train_rotvar.err"
  "$py" benches/torch_reference.py --device cuda --steps 50 >> "$out/train_torch.jsonl" 2>> "$out/train_torch.err"
done
"$py" - "$out" <<'PY'
import json, statistics, sys, os
d = sys.argv[1]
load = lambda f: [json.loads(l) for l in open(os.path.join(d, f)) if l.strip()] if os.path.exists(os.path.join(d, f)) else []
ours, ref = load("conv_rotvar.jsonl"), load("conv_cudnn.jsonl")
for o in ours:
    r = next((r for r in ref if r["layer"] == o["layer"] and r["pass"] == o["pass"]), None)
    if r:
        print(f"{o['layer']:>18} {o['pass']:>16}: rotvar {o['gflops']:8.0f} GFLOP/s  cuDNN {r['gflops']:8.0f}  ratio {o['gflops']/r['gflops']:.2f}")
to, tr = load("train_rotvar.jsonl"), load("train_torch.jsonl")
for m in ("lenet", "simpleconv"):
    a = [x["images_per_second"] for x in to if x["model"] == m]
    b = [x["images_per_second"] for x in tr if x["model"] == m]
    if a and b:
        print(f"train {m}: rotvar {statistics.median(a):.0f} img/s  pytorch {statistics.median(b):.0f} img/s  ratio {statistics.median(a)/statistics.median(b):.2f}")
PY
