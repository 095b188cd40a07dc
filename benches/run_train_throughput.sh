#!/usr/bin/env bash
# Training throughput, rotvar vs PyTorch, side by side in one run on the same machine.
#   [GEMMS="crate avx512 avx2"] [CONVS="im2col winograd"] [MODELS="lenet simpleconv resnet20"]
#   benches/run_train_throughput.sh [cpu|cuda] [rounds]
# Needs: a release build (cargo build --release) and a python with torch (PYTHON=...).
# GEMMS, CONVS: the CPU GEMM paths (--cpu-gemm) and convolution algorithms (--cpu-conv) to put
# side by side, every pair against the same PyTorch run.
# Each round runs rotvar then PyTorch per model, so drift in machine load hits both alike;
# the ratio reported is the median over rounds of rotvar/PyTorch images per second.
set -euo pipefail
device=${1:-cpu}
rounds=${2:-3}
steps=${STEPS:-20}
bin=${ROTVAR:-target/release/rotvar}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
threads=${THREADS:-$(nproc)}
gemms=${GEMMS:-crate}
convs=${CONVS:-winograd}
models=${MODELS:-lenet simpleconv}
out=$(mktemp)
"$bin" info | grep '^cpu:'
for r in $(seq "$rounds"); do
  for m in $models; do
    for g in $gemms; do
      for c in $convs; do
        "$bin" --threads "$threads" --cpu-gemm "$g" --cpu-conv "$c" bench train --models "$m" --steps "$steps" --device "$device" 2>/dev/null \
          | sed "s/^{/{\"gemm\":\"$g $c\",/" >>"$out"
      done
    done
    "$py" "$here/torch_reference.py" --models "$m" --steps "$steps" --device "$device" --threads "$threads" >>"$out"
  done
done
"$py" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gemms = list(dict.fromkeys(r["gemm"] for r in rows if r["impl"] == "rotvar"))
for m in sorted({r["model"] for r in rows}):
    ref = [r["images_per_second"] for r in rows if r["model"] == m and r["impl"] == "pytorch"]
    for g in gemms:
        ours = [r["images_per_second"] for r in rows if r["model"] == m and r["impl"] == "rotvar" and r["gemm"] == g]
        ratios = [a / b for a, b in zip(ours, ref)]
        print(f"{m:>11} [{g:>16}]: rotvar {statistics.median(ours):8.1f} img/s   pytorch {statistics.median(ref):8.1f} img/s"
              f"   ratio {statistics.median(ratios):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
PY
rm -f "$out"
