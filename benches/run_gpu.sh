#!/usr/bin/env bash
# Everything a GPU session should measure, in one call on the device machine:
#   selftest, per-kernel conv timings next to cuDNN, the GEMM variants, training throughput next
#   to PyTorch, the rotation kernel, rotated evaluation and the variance measure next to their baselines.
# Usage (from the repository root, release binary carried along): benches/run_gpu.sh OUTDIR
# DRY=1 benches/run_gpu.sh OUTDIR checks this script without a GPU, in a few minutes: rotvar
# on the kernel emulator (cuda-emu), PyTorch on the CPU, tiny sizes. Its figures mean nothing.
set -uo pipefail
out=${1:-${OUT:-/tmp/rotvar-gpu}}
mkdir -p "$out"
bin=${ROTVAR:-target/release/rotvar}
py=${PYTHON:-python3}
if [ -n "${DRY:-}" ]; then
  dev=cuda-emu tdev=cpu steps=1 reps=1 batch=4 images=16 rot_images=64 angles=2 eval_batch=8 measure_batch=4 rounds=1
  conv_models=lenet models=lenet measure_model=lenet
else
  dev=cuda tdev=cuda steps=50 reps=50 batch=256 images=10000 rot_images=200000 angles=16 eval_batch=4096 measure_batch=256 rounds=3
  conv_models=lenet,simpleconv,resnet18 models=lenet,simpleconv measure_model=simpleconv
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
fi
"$bin" info | tee "$out/info.txt"
"$bin" selftest --device "$dev" 2>&1 | tee "$out/selftest.txt"
echo "selftest exit: ${PIPESTATUS[0]}" | tee -a "$out/selftest.txt"
"$bin" bench conv --device "$dev" --steps "$steps" --batch-size "$batch" --models "$conv_models" > "$out/conv_rotvar.jsonl" 2> "$out/conv_rotvar.err"
# The same passes with the v1 kernels only: what the narrow v2 tiles gain on layers with few channels.
ROTVAR_CONV_V1=1 "$bin" bench conv --device "$dev" --steps "$steps" --batch-size "$batch" --models "$conv_models" > "$out/conv_rotvar_v1.jsonl" 2> "$out/conv_rotvar_v1.err"
"$py" benches/torch_conv_reference.py --device "$tdev" --reps "$reps" --batch-size "$batch" --models "$conv_models" > "$out/conv_cudnn.jsonl" 2> "$out/conv_cudnn.err"
"$bin" bench gemm --device "$dev" --steps "$steps" --batch-size "$batch" --models "$models" > "$out/gemm_rotvar.jsonl" 2> "$out/gemm_rotvar.err"
for r in $(seq "$rounds"); do
  "$bin" bench train --device "$dev" --models "$models" --steps "$steps" --batch-size "$batch" >> "$out/train_rotvar.jsonl" 2>> "$out/train_rotvar.err"
  "$py" benches/torch_reference.py --device "$tdev" --models "$models" --steps "$steps" --batch-size "$batch" >> "$out/train_torch.jsonl" 2>> "$out/train_torch.err"
done
# Rotation (issue 4) and the variance measure (issue 5).
"$bin" bench rotate --device "$dev" --images "$rot_images" --steps "$steps" > "$out/rotate_rotvar.jsonl" 2> "$out/rotate_rotvar.err"
for r in $(seq "$rounds"); do
  "$bin" bench eval-angles --device "$dev" --models "$models" --images "$images" --angles "$angles" --batch-size "$eval_batch" >> "$out/evalangles_rotvar.jsonl" 2>> "$out/evalangles_rotvar.err"
  (cd benches && "$py" torch_rotated_eval.py --device "$tdev" --models "$models" --images "$images" --angles "$angles" --batch-size "$eval_batch") >> "$out/evalangles_torch.jsonl" 2>> "$out/evalangles_torch.err"
done
for per in map element; do
  "$bin" bench measure --device "$dev" --models "$measure_model" --images "$images" --angles "$angles" --batch-size "$measure_batch" --per $per >> "$out/measure_rotvar.jsonl" 2>> "$out/measure_rotvar.err"
  (cd benches && "$py" torch_measure.py --device "$tdev" --models "$measure_model" --images "$images" --rotations "$angles" --batch-size "$measure_batch" --per $per) >> "$out/measure_torch.jsonl" 2>> "$out/measure_torch.err"
done
"$py" - "$out" <<'PY'
import json, statistics, sys, os
d = sys.argv[1]
load = lambda f: [json.loads(l) for l in open(os.path.join(d, f)) if l.strip()] if os.path.exists(os.path.join(d, f)) else []
ours, ref, v1 = load("conv_rotvar.jsonl"), load("conv_cudnn.jsonl"), load("conv_rotvar_v1.jsonl")
for o in ours:
    r = next((r for r in ref if r["layer"] == o["layer"] and r["pass"] == o["pass"]), None)
    b = next((b for b in v1 if b["layer"] == o["layer"] and b["pass"] == o["pass"]), None)
    if r:
        ceil = f"  ({100*o['fraction_of_ceiling']:.0f}% of the {o['ceiling_gflops']/1e3:.1f} TFLOP/s FMA ceiling)" if o.get("fraction_of_ceiling") else ""
        vs1 = f"  vs v1 kernels {o['gflops']/b['gflops']:.2f}x" if b else ""
        print(f"{o['layer']:>24} {o['pass']:>16}: rotvar {o['gflops']:8.0f} GFLOP/s  cuDNN {r['gflops']:8.0f}  ratio {o['gflops']/r['gflops']:.2f}{ceil}{vs1}")
gemm = load("gemm_rotvar.jsonl")
for g in gemm:
    v1 = next((x for x in gemm if x["shape"] == g["shape"] and x["variant"] == "v1"), None)
    ceil = f"  ({100*g['fraction_of_ceiling']:.0f}% of the FMA ceiling)" if g.get("fraction_of_ceiling") else ""
    print(f"gemm {g['shape']:>18} {g['m']}x{g['n']}x{g['k']} {g['variant']:>22}: {g['median_ms']*1e3:8.1f} us {g['gflops']:8.0f} GFLOP/s  vs v1 {v1['median_ms']/g['median_ms']:.2f}x{ceil}")
to, tr = load("train_rotvar.jsonl"), load("train_torch.jsonl")
for m in ("lenet", "simpleconv"):
    a = [x["images_per_second"] for x in to if x["model"] == m]
    b = [x["images_per_second"] for x in tr if x["model"] == m]
    if a and b:
        ka = [x.get("kernel_launches_per_step") for x in to if x["model"] == m]
        kb = [x.get("kernel_launches_per_step") for x in tr if x["model"] == m]
        k = f"; kernels per step rotvar {ka[0]:.0f}, pytorch {kb[0]:.0f}" if ka and kb and ka[0] is not None and kb[0] is not None else ""
        print(f"train {m}: rotvar {statistics.median(a):.0f} img/s  pytorch {statistics.median(b):.0f} img/s  ratio {statistics.median(a)/statistics.median(b):.2f}{k}")
for r in load("rotate_rotvar.jsonl"):
    print(f"rotate: {r['rotate_gb_per_s']:.0f} GB/s vs device copy {r['copy_gb_per_s']:.0f} GB/s: {100*r['ratio']:.0f}% (target >= 80%)")
eo, et = load("evalangles_rotvar.jsonl"), load("evalangles_torch.jsonl")
for m in ("lenet", "simpleconv"):
    a = [x["seconds"] for x in eo if x["model"] == m]
    b = [x["seconds"] for x in et if x["model"] == m]
    if a and b:
        n, k = eo[0]["images"], eo[0]["angles"]
        print(f"eval {n} x {k} angles {m}: rotvar {statistics.median(a):.3f}s  pytorch {statistics.median(b):.3f}s  speed-up {statistics.median(b)/statistics.median(a):.2f}x (target >= 2 for lenet)")
mo, mt = load("measure_rotvar.jsonl"), load("measure_torch.jsonl")
for o in mo:
    t = next((t for t in mt if t["per"] == o["per"]), None)
    line = f"measure {o['model']} per {o['per']}: forward alone {o['forward_seconds']:.3f}s, measure {o['measure_seconds']:.3f}s, overhead {100*o['overhead']:.0f}% (target <= 25%)"
    if t:
        line += f"; pytorch hooks+welford {t['measure_seconds']:.3f}s, speed-up {t['measure_seconds']/o['measure_seconds']:.1f}x (target >= 10)"
    if o.get("peak_extra_bytes") is not None:
        line += f"; peak extra GPU memory {o['peak_extra_bytes']/2**20:.1f} MiB for {o['images']} images, {o['peak_extra_bytes_quarter']/2**20:.1f} MiB for a quarter (target: equal)"
    print(line)
PY
