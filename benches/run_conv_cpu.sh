#!/usr/bin/env bash
# Convolution passes on the CPU, rotvar vs PyTorch (oneDNN) side by side in one run.
#   [MODELS=lenet,simpleconv,resnet18] benches/run_conv_cpu.sh [rounds]
# Needs a release build and a python with torch (PYTHON=...). Rounds alternate rotvar and
# PyTorch so that drift in machine load hits both alike; the table shows medians over rounds.
set -euo pipefail
rounds=${1:-3}
bin=${ROTVAR:-target/release/rotvar}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
threads=${THREADS:-$(nproc)}
models=${MODELS:-lenet,simpleconv}
out=$(mktemp)
for r in $(seq "$rounds"); do
  "$bin" --threads "$threads" bench conv --device cpu --steps 5 --models "$models" 2>/dev/null | sed 's/^{/{"impl":"rotvar",/' >>"$out"
  "$py" "$here/torch_conv_reference.py" --device cpu --threads "$threads" --reps 5 --models "$models" >>"$out"
done
"$py" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = []
for r in rows:
    if (r["layer"], r["pass"]) not in keys:
        keys.append((r["layer"], r["pass"]))
print("| layer | pass | rotvar GFLOP/s | PyTorch GFLOP/s | ratio |")
print("|---|---|---|---|---|")
for layer, p in keys:
    med = lambda impl: statistics.median(r["gflops"] for r in rows if r["layer"] == layer and r["pass"] == p and r["impl"] == impl)
    a, b = med("rotvar"), med("pytorch-cpu")
    print(f"| {layer} | {p} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
PY
rm -f "$out"
