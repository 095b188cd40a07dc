#!/usr/bin/env bash
# One GPU lease in one call on the device machine (plan: benches/LEASE.md).
#
#   Phase 1 (at most PHASE1_BUDGET s): `rotvar info` must show compiled kernels (and a GPU),
#   `rotvar selftest` must pass, then the selftest again under compute-sanitizer (memcheck,
#   racecheck, synccheck, initcheck, side by side) where the machine has it. Any failure ends
#   the run here: summary written, exit 1.
#   Phase 2: every benchmark (conv vs cuDNN, the v1 conv kernels, GEMM, training vs PyTorch,
#   rotation, rotated evaluation, the variance measure), each under its own limit. One that
#   fails is recorded and the run goes on; one that no longer fits the budget is skipped.
#
# Every step runs under `timeout`, and the whole run stops starting steps once BUDGET seconds
# are near, so it ends by itself inside the lease's command limit. OUTDIR receives three files,
# rewritten after every step (a run cut short still leaves them): summary.md, results.json and
# raw.tar.gz (every step's stdout and stderr). A lease returns at most 8 files.
#
# Usage (repository root, release binary built with NVCC set):  benches/run_gpu.sh OUTDIR
# DRY=1 benches/run_gpu.sh OUTDIR runs the same steps without a GPU: rotvar on the kernel
# emulator (cuda-emu), PyTorch on the CPU from a venv this script installs once
# (~/.cache/rotvar/torch-venv), tiny sizes, no compute-sanitizer. Its figures mean nothing; it
# proves the script and the PyTorch baselines run.
# Environment: BUDGET (s), ROTVAR (binary), PYTHON (skips the venv), COMPUTE_SANITIZER (path),
# PHASES=2 (phase 2 only: a rerun in a lease whose phase 1 already passed).
# Exit: 0 all ok, 1 phase 1 failed, 2 cannot start, 3 a benchmark failed, timed out or was skipped.
set -uo pipefail

# ------------------------------------------------------------------ sizes and limits
# Limits are seconds of wall time per step; a step also never runs past the budget.
TORCH_PIN=torch==2.11.0 # the device image's version (.library KINDS.md: 2.11.0)
if [ -n "${DRY:-}" ]; then
  mode=dry dev=cuda-emu tdev=cpu
  steps=1 reps=1 batch=4 images=16 rot_images=64 angles=2 eval_batch=8 measure_batch=4 rounds=2
  conv_models=lenet models=lenet measure_model=lenet
  budget=${BUDGET:-5400} phase1_budget=1500
  t_smi=0 t_info=60 t_selftest=1200 t_sanitize=0 t_racecheck=0 t_conv=600 t_cudnn=300 t_gemm=600
  t_train=600 t_torch_train=300 t_rotate=600 t_eval=600 t_torch_eval=300 t_measure=600 t_torch_measure=300
  t_install=1200 # once per machine; not counted in the budget
else
  mode=gpu dev=cuda tdev=cuda
  steps=50 reps=50 batch=256 images=10000 rot_images=200000 angles=16 eval_batch=4096 measure_batch=256 rounds=3
  conv_models=lenet,simpleconv,resnet18 models=lenet,simpleconv measure_model=simpleconv
  # The selftest and the sanitizers now also run the tensor-core kernels (tf32, 3xtf32, bf16).
  budget=${BUDGET:-330} phase1_budget=180
  t_smi=10 t_info=10 t_selftest=60 t_sanitize=60 t_racecheck=120 t_conv=60 t_cudnn=90 t_gemm=40
  t_train=40 t_torch_train=60 t_rotate=40 t_eval=40 t_torch_eval=60 t_measure=40 t_torch_measure=60
fi
margin=5   # seconds kept back at the end for the summary and the tarball
min_step=5 # a step with less time than this left is skipped rather than started

# ------------------------------------------------------------------ setup
out=${1:-}
if [ -z "$out" ]; then
  echo "usage: [DRY=1] benches/run_gpu.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
bin=${ROTVAR:-target/release/rotvar}
if [ ! -x "$bin" ]; then
  echo "run_gpu.sh: no executable $bin: build it with NVCC set (benches/LEASE.md)" >&2
  exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/rotvar-lease.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
raw=$work/raw
mkdir -p "$raw"
: >"$raw/steps.tsv"
start=$SECONDS
deadline=$((start + budget))
p1_deadline=$((start + phase1_budget))
failures=0

setenv() { printf '%s=%s\n' "$1" "$2" >>"$raw/run.env"; }
py_sys=$(command -v python3 || true)

# The summary and the tarball, from what the steps have left so far (atomic replacements).
refresh() {
  if [ -n "$py_sys" ]; then
    "$py_sys" benches/lease_summary.py "$raw" "$out" "$@" || echo "run_gpu.sh: the summary failed" >&2
  fi
  tar -czf "$out/.raw.tmp" -C "$work" raw && mv -f "$out/.raw.tmp" "$out/raw.tar.gz"
}

record() { # phase step status seconds limit log note
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$raw/steps.tsv"
}

# run_cmd PHASE STEP LIMIT STDOUT-FILE CMD...: CMD under `timeout`, appending to STDOUT-FILE and
# its .err twin in $raw, limited to what is left of the phase's time; records the outcome.
run_cmd() {
  local phase=$1 step=$2 limit=$3 log=$4
  shift 4
  local end=$deadline
  if [ "$phase" = 1 ] && ((p1_deadline < end)); then end=$p1_deadline; fi
  local left=$((end - SECONDS - margin))
  if ((left < min_step)); then
    record "$phase" "$step" skipped 0 "$limit" "$log" "no time left in the budget"
    return 125
  fi
  ((limit > left)) && limit=$left
  echo "== [$phase] $step (limit ${limit}s)" >&2
  local t0=$EPOCHREALTIME rc status note=""
  timeout -k 5 "$limit" "$@" >>"$raw/$log" 2>>"$raw/${log%.*}.err" </dev/null
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout note="killed after ${limit}s" ;;
    *) status="exit $rc" note=$(tail -n 1 "$raw/${log%.*}.err" 2>/dev/null | tr '\t|' '  ' | cut -c1-160) ;;
  esac
  record "$phase" "$step" "$status" "$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")" "$limit" "$log" "$note"
  return "$rc"
}

# run_step: run_cmd, then the summary; a phase-2 step that is not ok counts as a failure.
run_step() {
  local phase=$1
  run_cmd "$@"
  local rc=$?
  if [ "$phase" = 2 ] && [ "$rc" != 0 ]; then failures=$((failures + 1)); fi
  refresh
  return "$rc"
}

phase1_fail() {
  setenv PHASE1 FAILED
  setenv PHASE1_REASON "$1"
  setenv FINISHED "$(date -u +%FT%TZ) after $((SECONDS - start)) s"
  record 1 "phase 1 verdict" failed 0 0 - "$1"
  refresh --print
  echo "run_gpu.sh: phase 1 failed: $1" >&2
  exit 1
}

# The PyTorch baselines: the machine's python3 on the GPU; on a dry run a venv with the CPU-capable
# torch from PyPI (the CUDA build: PyPI has no CPU-only wheel for x86-64 Linux, and torch does not
# import without its nvidia-* libraries), installed once and reused.
torch_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    return 0
  fi
  if [ -z "${DRY:-}" ]; then
    echo python3
    return 0
  fi
  local venv=${TORCH_VENV:-$HOME/.cache/rotvar/torch-venv}
  if [ "$(cat "$venv/.rotvar-pin" 2>/dev/null)" = "$TORCH_PIN" ] && "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "$venv/bin/python"
    return 0
  fi
  echo "run_gpu.sh: installing $TORCH_PIN into $venv (once; several minutes)" >&2
  rm -rf "$venv"
  local t0=$SECONDS
  if timeout "$t_install" bash -c "'$py_sys' -m venv '$venv' && '$venv/bin/python' -m pip install -q --only-binary=:all: '$TORCH_PIN' numpy" >&2 &&
    "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "$TORCH_PIN" >"$venv/.rotvar-pin"
    echo "run_gpu.sh: $TORCH_PIN installed in $((SECONDS - t0)) s" >&2
    echo "$venv/bin/python"
    return 0
  fi
  echo "run_gpu.sh: installing $TORCH_PIN failed after $((SECONDS - t0)) s" >&2
  return 1
}

# ------------------------------------------------------------------ context
setenv MODE "$mode"
setenv STARTED "$(date -u +%FT%TZ) on $(hostname)"
setenv BINARY "$bin, $(stat -c %s "$bin") bytes"
setenv SIZES "steps=$steps reps=$reps batch=$batch images=$images rot_images=$rot_images angles=$angles eval_batch=$eval_batch measure_batch=$measure_batch rounds=$rounds conv_models=$conv_models models=$models measure_model=$measure_model"
setenv BUDGET "$budget s (phase 1: $phase1_budget s)"
t_py=$SECONDS
if py=$(torch_python); then
  setenv PYTHON "$py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>/dev/null || echo 'torch not importable'))"
else
  py=python3
  setenv PYTHON "no torch: installing $TORCH_PIN failed (see the log above)"
fi
if [ -n "${DRY:-}" ]; then
  # The install (and the first torch import) is setup, not part of the run's budget.
  deadline=$((deadline + SECONDS - t_py))
  p1_deadline=$((p1_deadline + SECONDS - t_py))
fi
san=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)}

# ------------------------------------------------------------------ phase 1
if [ "${PHASES:-1,2}" != 2 ]; then
  if [ "$mode" = gpu ]; then
    run_step 1 nvidia-smi "$t_smi" gpu.txt nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    setenv DEVICE "$(tail -n +2 "$raw/gpu.txt" | head -n 1)"
  else
    setenv DEVICE "none (dry run: rotvar on cuda-emu, PyTorch on the CPU)"
  fi

  run_step 1 "rotvar info" "$t_info" info.txt "$bin" info || phase1_fail "rotvar info did not run (see info.err)"
  kernels=$(grep -m1 '^cuda kernels:' "$raw/info.txt")
  if [ -z "$kernels" ] || grep -qiE 'not compiled|none' <<<"$kernels"; then
    phase1_fail "the binary has no GPU kernels ('${kernels:-no cuda kernels line}'): rebuild with NVCC set"
  fi
  if [ "$mode" = gpu ] && ! grep -q '^gpu: cuda' "$raw/info.txt"; then
    phase1_fail "rotvar sees no GPU: $(grep -m1 '^gpu:' "$raw/info.txt")"
  fi

  run_step 1 "selftest $dev" "$t_selftest" selftest.txt "$bin" selftest --device "$dev"
  rc=$?
  if [ "$rc" != 0 ] || grep -q MISMATCH "$raw/selftest.txt"; then
    phase1_fail "selftest on $dev: $(grep -c MISMATCH "$raw/selftest.txt") mismatches, exit $rc (see selftest.txt/.err)"
  fi

  tools=(memcheck racecheck synccheck initcheck)
  if [ "$mode" = dry ]; then
    setenv SANITIZER "skipped: dry run (no GPU; the emulator is not a CUDA process)"
    record 1 compute-sanitizer skipped 0 0 - "dry run: no GPU"
  elif [ -z "$san" ] || [ ! -x "$san" ]; then
    setenv SANITIZER "skipped: compute-sanitizer not found on this machine"
    record 1 compute-sanitizer skipped 0 0 - "not found"
  else
    setenv SANITIZER "$san"
    # Side by side: each run is mostly the sanitizer's own CPU work, and the machine has 16 cores.
    # racecheck is the slow one: about 60 s on the H200 (2026-12-04), where 50 s cut it off once.
    for tool in "${tools[@]}"; do
      limit=$t_sanitize
      [ "$tool" = racecheck ] && limit=$t_racecheck
      run_cmd 1 "sanitizer $tool" "$limit" "sanitize_$tool.txt" \
        "$san" --tool "$tool" --error-exitcode 86 --print-limit 20 "$bin" selftest --device cuda --small --steps 5 &
    done
    wait
    refresh
    for tool in "${tools[@]}"; do
      f=$raw/sanitize_$tool.txt
      status=$(awk -F'\t' -v s="sanitizer $tool" '$2 == s { print $3 }' "$raw/steps.tsv")
      if grep -qE 'Device not supported|[Uu]nable to (find|load|initialize)|not supported on this' "$f" "${f%.txt}.err" 2>/dev/null; then
        record 1 "sanitizer $tool verdict" skipped 0 0 - "compute-sanitizer cannot run here"
      elif [ "$status" = "exit 86" ] || grep -qE '^========= (ERROR SUMMARY: [1-9]|Invalid |Error: Race|.*[Hh]azard|Barrier error|Uninitialized )' "$f" "${f%.txt}.err" 2>/dev/null; then
        phase1_fail "compute-sanitizer $tool reports errors (see sanitize_$tool.txt)"
      elif [ "$status" != ok ]; then
        # No error reported (the plain selftest passed): a tool that timed out or broke is noted, not fatal.
        record 1 "sanitizer $tool verdict" inconclusive 0 0 - "$status without a reported error"
      fi
    done
  fi
  setenv PHASE1 passed
  refresh
fi

# ------------------------------------------------------------------ phase 2
r1=(--device "$dev")
rb() { run_step 2 "$@"; } # one benchmark; its failure is recorded and the run goes on
rb "conv rotvar" "$t_conv" conv_rotvar.jsonl "$bin" bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
rb "conv cudnn" "$t_cudnn" conv_cudnn.jsonl "$py" benches/torch_conv_reference.py --device "$tdev" --reps "$reps" --batch-size "$batch" --models "$conv_models"
rb "gemm rotvar" "$t_gemm" gemm_rotvar.jsonl "$bin" bench gemm "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$models"
bench_round() { # the benchmarks repeated for a median, one round
  rb "train rotvar r$1" "$t_train" train_rotvar.jsonl "$bin" bench train "${r1[@]}" --models "$models" --steps "$steps" --batch-size "$batch"
  rb "train rotvar plain r$1" "$t_train" train_rotvar_plain.jsonl env ROTVAR_CUDA_GRAPHS=0 "$bin" bench train "${r1[@]}" --models "$models" --steps "$steps" --batch-size "$batch"
  rb "train pytorch r$1" "$t_torch_train" train_torch.jsonl "$py" benches/torch_reference.py --device "$tdev" --models "$models" --steps "$steps" --batch-size "$batch"
  rb "eval-angles rotvar r$1" "$t_eval" evalangles_rotvar.jsonl "$bin" bench eval-angles "${r1[@]}" --models "$models" --images "$images" --angles "$angles" --batch-size "$eval_batch"
  rb "eval-angles pytorch r$1" "$t_torch_eval" evalangles_torch.jsonl "$py" benches/torch_rotated_eval.py --device "$tdev" --models "$models" --images "$images" --angles "$angles" --batch-size "$eval_batch"
}
bench_round 1
rb "rotate rotvar" "$t_rotate" rotate_rotvar.jsonl "$bin" bench rotate "${r1[@]}" --images "$rot_images" --steps "$steps"
for per in map element; do
  rb "measure rotvar $per" "$t_measure" measure_rotvar.jsonl "$bin" bench measure "${r1[@]}" --models "$measure_model" --images "$images" --angles "$angles" --batch-size "$measure_batch" --per "$per"
  rb "measure pytorch $per" "$t_torch_measure" measure_torch.jsonl "$py" benches/torch_measure.py --device "$tdev" --models "$measure_model" --images "$images" --rotations "$angles" --batch-size "$measure_batch" --per "$per"
done
# The measure with the v1 variance update (a thread per unit): what v2 (per unit and class) gains.
for per in map element; do
  rb "measure rotvar $per v1" "$t_measure" measure_rotvar_v1.jsonl env ROTVAR_VARIANCE_V1=1 "$bin" bench measure "${r1[@]}" --models "$measure_model" --images "$images" --angles "$angles" --batch-size "$measure_batch" --per "$per"
done
# The measure without graphs (its passes replay as one since session 18): what the replays gain.
rb "measure rotvar map plain" "$t_measure" measure_rotvar_plain.jsonl env ROTVAR_CUDA_GRAPHS=0 "$bin" bench measure "${r1[@]}" --models "$measure_model" --images "$images" --angles "$angles" --batch-size "$measure_batch" --per map
# The same passes with the v1 conv kernels only: what the narrow tiles and the SM-aware choice gain.
rb "conv rotvar v1" "$t_conv" conv_rotvar_v1.jsonl env ROTVAR_CONV_TILES=v1 "$bin" bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
# v4 (128 x 128 tiles, 8 x 8 per thread), not chosen by default until these rows say so.
rb "conv rotvar v4" "$t_conv" conv_rotvar_v4.jsonl env ROTVAR_CONV_TILES=v4 "$bin" bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
# v5: v4's tiles filled by cp.async, double-buffered (new in session 18), beside v4 and the default.
rb "conv rotvar v5" "$t_conv" conv_rotvar_v5.jsonl env ROTVAR_CONV_TILES=v5 "$bin" bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
# The same in TF32 on tensor cores (128 x 128 tiles, 64 x 32 warp tiles), beside cuDNN's TF32 below.
rb "conv rotvar tf32 v5" "$t_conv" conv_rotvar_tf32_v5.jsonl env ROTVAR_CONV_TILES=v5 "$bin" --precision tf32 bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
# Tensor cores against cuDNN at the same precision on both sides.
for prec in tf32 bf16; do
  rb "conv rotvar $prec" "$t_conv" "conv_rotvar_$prec.jsonl" "$bin" --precision "$prec" bench conv "${r1[@]}" --steps "$steps" --batch-size "$batch" --models "$conv_models"
  rb "conv cudnn $prec" "$t_cudnn" "conv_cudnn_$prec.jsonl" "$py" benches/torch_conv_reference.py --device "$tdev" --reps "$reps" --batch-size "$batch" --models "$conv_models" --precision "$prec"
done
for r in $(seq 2 "$rounds"); do bench_round "$r"; done

setenv FINISHED "$(date -u +%FT%TZ) after $((SECONDS - start)) s, $failures benchmark steps not ok"
refresh --print
[ "$failures" = 0 ] || exit 3
exit 0
