#!/usr/bin/env bash
# Training throughput, rotvar vs PyTorch, side by side in one run on the same machine.
#   [GEMMS="auto crate avx2"] [CONVS="im2col winograd"] [MODELS="lenet simpleconv resnet20"]
#   [TORCH_ISA=avx2] benches/run_train_throughput.sh [cpu|cuda] [rounds]
# Needs: a release build (cargo build --release) and a python with torch (PYTHON=...).
# GEMMS, CONVS: the CPU GEMM paths (--cpu-gemm) and convolution algorithms (--cpu-conv) to put
# side by side, every pair against the same PyTorch run.
# Each round runs rotvar then PyTorch per model, so drift in machine load hits both alike;
# the ratio reported is the median over rounds of rotvar/PyTorch images per second.
# TORCH_ISA=avx2 caps PyTorch's vector set too (ATen's ATEN_CPU_CAPABILITY and oneDNN's
# ONEDNN_MAX_CPU_ISA), so that `GEMMS=avx2` on an AVX-512 machine compares two AVX2 engines, as
# on a machine without AVX-512; the line below the table names the capability PyTorch ran.
set -euo pipefail
device=${1:-cpu}
rounds=${2:-3}
steps=${STEPS:-20}
bin=${ROTVAR:-target/release/rotvar}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
threads=${THREADS:-$(nproc)}
gemms=${GEMMS:-auto}
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
    if [ -n "${TORCH_ISA:-}" ]; then
      ATEN_CPU_CAPABILITY=$TORCH_ISA ONEDNN_MAX_CPU_ISA=${TORCH_ISA^^} \
        "$py" "$here/torch_reference.py" --models "$m" --steps "$steps" --device "$device" --threads "$threads" >>"$out"
    else
      "$py" "$here/torch_reference.py" --models "$m" --steps "$steps" --device "$device" --threads "$threads" >>"$out"
    fi
  done
done
"$py" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gemms = list(dict.fromkeys(r["gemm"] for r in rows if r["impl"] == "rotvar"))
caps = sorted({str(r.get("cpu_capability")) for r in rows if r["impl"] == "pytorch"})
for m in sorted({r["model"] for r in rows}):
    ref = [r["images_per_second"] for r in rows if r["model"] == m and r["impl"] == "pytorch"]
    for g in gemms:
        ours = [r["images_per_second"] for r in rows if r["model"] == m and r["impl"] == "rotvar" and r["gemm"] == g]
        ratios = [a / b for a, b in zip(ours, ref)]
        print(f"{m:>11} [{g:>16}]: rotvar {statistics.median(ours):8.1f} img/s   pytorch {statistics.median(ref):8.1f} img/s"
              f"   ratio {statistics.median(ratios):.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
print(f"PyTorch CPU capability: {', '.join(caps)}")
PY
rm -f "$out"
