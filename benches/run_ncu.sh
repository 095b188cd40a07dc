#!/usr/bin/env bash
# Per-kernel device time, DRAM bytes and throughput under Nsight Compute, for the benchmarks whose
# gap to their target is largest: the variance measure (overhead over the forward pass), the
# rotation (share of copy bandwidth) and one SimpleConv training step (where the time goes).
# Runs on the lease machine after run_gpu.sh; each profile has its own limit and at most 400
# profiled launches, so the whole script ends within about 3 minutes. (2026-12-04, H200: with no
# launch cap the measure profile reached 245 launches in 75 s, all of them in the forward passes
# before the variance kernels, and the training profile none in 60 s.)
# Writes ncu_<name>.csv (raw, one row per kernel launch and metric)
# (and ncu.log, every profile's stderr) into OUTDIR; benches/ncu_summary.py turns them into per-kernel totals here.
# Usage: ROTVAR=target/lease/rotvar benches/run_ncu.sh OUTDIR
set -uo pipefail
out=${1:?usage: benches/run_ncu.sh OUTDIR}
mkdir -p "$out"
bin=${ROTVAR:-target/release/rotvar}
ncu=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)}
if [ -z "$ncu" ]; then
  echo "run_ncu.sh: ncu not found" >&2
  exit 2
fi
metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size
profile() { # name limit cmd...
  local name=$1 limit=$2
  shift 2
  echo "== ncu $name (limit ${limit}s)" >&2
  timeout -k 5 "$limit" "$ncu" --clock-control none --launch-count 400 --csv --metrics "$metrics" "$@" >"$out/ncu_$name.csv" 2>>"$out/ncu.log"
  echo "   exit $? after $SECONDS s" | tee -a "$out/ncu.log" >&2
}
profile measure 75 "$bin" bench measure --device cuda --models simpleconv --images 256 --angles 2 --batch-size 256 --per map
profile rotate 30 "$bin" bench rotate --device cuda --images 20000 --steps 3
profile train 60 "$bin" bench train --device cuda --models simpleconv --steps 2 --warmup 1 --batch-size 256
