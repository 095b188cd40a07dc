#!/usr/bin/env python3
"""Per-kernel totals from the CSV files benches/run_ncu.sh writes (ncu --csv --metrics ...).

Usage: benches/ncu_summary.py ncu_measure.csv [ncu_rotate.csv ...]

For each file: the launches profiled and their device time, then one line per kernel name,
largest time first: launches, time and its share, DRAM bytes over time, and the per-launch means
of SM throughput, memory throughput, achieved occupancy and registers (percentages of peak as
ncu reports them). A profile cut short by its time limit still lists the launches it finished."""
import collections
import csv
import sys

TIME, READ, WRITE = "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"
MEANS = [
    ("sm", "sm__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("mem", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("occ", "sm__warps_active.avg.pct_of_peak_sustained_active", "%"),
    ("regs", "launch__registers_per_thread", ""),
]


def summarize(path):
    with open(path) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if not rows:
        print(f"== {path}: no profiled launches")
        return
    header, rows = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    launches = collections.defaultdict(set)
    for r in rows:
        kernel, metric, value = r[col["Kernel Name"]], r[col["Metric Name"]], r[col["Metric Value"]]
        launches[kernel].add(r[col["ID"]])
        totals[kernel][metric] += float(value.replace(",", "")) if value else 0.0
    all_ns = sum(t[TIME] for t in totals.values())
    count = sum(len(v) for v in launches.values())
    print(f"== {path}: {count} launches, {all_ns / 1e3:.0f} us of kernel time")
    for kernel, t in sorted(totals.items(), key=lambda kv: -kv[1][TIME]):
        n, ns = len(launches[kernel]), t[TIME]
        gbs = (t[READ] + t[WRITE]) / ns if ns else 0.0  # bytes per ns = GB/s
        means = "  ".join(f"{label} {t[m] / n:5.1f}{unit}" for label, m, unit in MEANS)
        print(f"{kernel[:40]:40} n={n:4} {ns / 1e3:9.1f} us {100 * ns / all_ns:5.1f}%  {gbs:7.1f} GB/s  {means}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        summarize(p)
