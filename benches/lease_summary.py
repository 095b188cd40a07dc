#!/usr/bin/env python3
"""The summary of one benches/run_gpu.sh run, rewritten after every step so that a run cut short
still leaves one: OUT/summary.md (what a person reads: the verdict of phase 1, every step with its
status and time, then the ratios against the baselines) and OUT/results.json (the same, for tools).

Usage: lease_summary.py RAWDIR OUTDIR [--print]. Standard library only: it runs under whatever
python3 the machine has. RAWDIR holds run.env (the run's settings, KEY=VALUE lines), steps.tsv
(phase, step, status, seconds, limit, log, note per line) and the benchmarks' JSON lines."""
import json, os, statistics, sys


def load_env(raw):
    env = {}
    path = os.path.join(raw, "run.env")
    if os.path.exists(path):
        for line in open(path):
            k, sep, v = line.rstrip("\n").partition("=")
            if sep:
                env[k] = v
    return env


def load_steps(raw):
    steps = []
    path = os.path.join(raw, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            f = line.rstrip("\n").split("\t")
            if len(f) >= 7:
                steps.append(dict(zip(("phase", "step", "status", "seconds", "limit", "log", "note"), f[:7])))
    return steps


class Jsonl:
    """The JSON lines of the benchmarks; a line that does not parse is counted, not fatal."""

    def __init__(self, raw):
        self.raw, self.bad = raw, {}

    def __call__(self, name):
        path = os.path.join(self.raw, name)
        rows = []
        if os.path.exists(path):
            for line in open(path, errors="replace"):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    self.bad[name] = self.bad.get(name, 0) + 1
        return rows


def paired(ours, theirs, key):
    """Per model of rotvar's runs: the median of `key` over them, their number, and the median
    over PyTorch's runs of that model (None without any)."""
    for m in sorted({x["model"] for x in ours}):
        a = [x[key] for x in ours if x["model"] == m]
        b = [x[key] for x in theirs if x["model"] == m]
        yield m, statistics.median(a), len(a), statistics.median(b) if b else None


def ratios(load):
    """The comparison lines the run prints: rotvar against cuDNN, PyTorch and its own v1 kernels."""
    out = []
    ours, ref, v1 = load("conv_rotvar.jsonl"), load("conv_cudnn.jsonl"), load("conv_rotvar_v1.jsonl")
    for o in ours:
        r = next((r for r in ref if r.get("layer") == o.get("layer") and r.get("pass") == o.get("pass")), None)
        b = next((b for b in v1 if b.get("layer") == o.get("layer") and b.get("pass") == o.get("pass")), None)
        ceil = ""
        if o.get("fraction_of_ceiling"):
            ceil = f"  ({100*o['fraction_of_ceiling']:.0f}% of the {o['ceiling_gflops']/1e3:.1f} TFLOP/s FMA ceiling)"
        vs1 = f"  vs v1 kernels {o['gflops']/b['gflops']:.2f}x" if b and b.get("gflops") else ""
        base = f"cuDNN {r['gflops']:8.0f}  ratio {o['gflops']/r['gflops']:.2f}" if r and r.get("gflops") else "no baseline"
        out.append(f"{o['layer']:>24} {o['pass']:>16}: rotvar {o['gflops']:8.0f} GFLOP/s  {base}{ceil}{vs1}")
    for tag in ("v4", "v5"):
        for o in load(f"conv_rotvar_{tag}.jsonl"):
            d = next((d for d in ours if d.get("layer") == o.get("layer") and d.get("pass") == o.get("pass")), None)
            if d and d.get("gflops"):
                out.append(f"{o['layer']:>24} {o['pass']:>16}: {tag} {o['gflops']:8.0f} GFLOP/s  vs the default choice {o['gflops']/d['gflops']:.2f}x")
    for prec, tag in (("tf32", ""), ("bf16", ""), ("tf32", "_v5")):
        mine, theirs = load(f"conv_rotvar_{prec}{tag}.jsonl"), load(f"conv_cudnn_{prec}.jsonl")
        for o in mine:
            r = next((r for r in theirs if r.get("layer") == o.get("layer") and r.get("pass") == o.get("pass")), None)
            d = next((d for d in ours if d.get("layer") == o.get("layer") and d.get("pass") == o.get("pass")), None)
            base = f"cuDNN {prec} {r['gflops']:8.0f}  ratio {o['gflops']/r['gflops']:.2f} (target >= 0.8)" if r and r.get("gflops") else "no baseline"
            vs = f"  vs rotvar fp32 {o['gflops']/d['gflops']:.2f}x" if d and d.get("gflops") else ""
            out.append(f"{o['layer']:>24} {o['pass']:>16}: {prec}{tag} {o['gflops']:8.0f} GFLOP/s  {base}{vs}")
    gemm = load("gemm_rotvar.jsonl")
    for g in gemm:
        b = next((x for x in gemm if x["shape"] == g["shape"] and x["variant"] == "v1"), None)
        vs1 = f"  vs v1 {b['median_ms']/g['median_ms']:.2f}x" if b else ""
        ceil = f"  ({100*g['fraction_of_ceiling']:.0f}% of the FMA ceiling)" if g.get("fraction_of_ceiling") else ""
        out.append(f"gemm {g['shape']:>18} {g['m']}x{g['n']}x{g['k']} {g['variant']:>22}: "
                   f"{g['median_ms']*1e3:8.1f} us {g['gflops']:8.0f} GFLOP/s{vs1}{ceil}")
    to, tr = load("train_rotvar.jsonl"), load("train_torch.jsonl")
    for m, a, runs, b in paired(to, tr, "images_per_second"):
        line = f"train {m}: rotvar {a:.0f} img/s ({runs} runs)"
        if b is not None:
            line += f"  pytorch {b:.0f} img/s  ratio {a/b:.2f}"
            ka = next((x.get("kernel_launches_per_step") for x in to if x["model"] == m), None)
            kb = next((x.get("kernel_launches_per_step") for x in tr if x["model"] == m), None)
            if ka is not None and kb is not None:
                line += f"; kernels launched per step rotvar {ka:.0f}, pytorch {kb:.0f}"
        g = next((x for x in to if x["model"] == m), {})
        if g.get("graph_replays_per_step") is not None:
            line += f"; graph replays per step {g['graph_replays_per_step']:.0f}, kernels per replay {g.get('kernels_per_replay')}"
        plain = [x["images_per_second"] for x in load("train_rotvar_plain.jsonl") if x["model"] == m]
        if plain:
            p = sorted(plain)[len(plain) // 2]
            line += f"; without graphs {p:.0f} img/s (graphs gain {a/p:.2f}x)"
        out.append(line)
    for r in load("rotate_rotvar.jsonl"):
        out.append(f"rotate: {r['rotate_gb_per_s']:.0f} GB/s vs device copy {r['copy_gb_per_s']:.0f} GB/s: "
                   f"{100*r['ratio']:.0f}% (target >= 80%)")
    eo = load("evalangles_rotvar.jsonl")
    for m, a, runs, b in paired(eo, load("evalangles_torch.jsonl"), "seconds"):
        line = f"eval {eo[0]['images']} x {eo[0]['angles']} angles {m}: rotvar {a:.3f}s ({runs} runs)"
        if b is not None:
            line += f"  pytorch {b:.3f}s  speed-up {b/a:.2f}x (target >= 2 for lenet)"
        out.append(line)
    mo, mt, m1 = load("measure_rotvar.jsonl"), load("measure_torch.jsonl"), load("measure_rotvar_v1.jsonl")
    mp = load("measure_rotvar_plain.jsonl")
    for o in mo:
        t = next((t for t in mt if t.get("per") == o.get("per")), None)
        v1 = next((x for x in m1 if x.get("per") == o.get("per")), None)
        plain = next((x for x in mp if x.get("per") == o.get("per")), None)
        line = (f"measure {o['model']} per {o['per']}: forward alone {o['forward_seconds']:.3f}s, "
                f"measure {o['measure_seconds']:.3f}s, overhead {100*o['overhead']:.0f}% (target <= 25%)")
        if t:
            line += (f"; pytorch hooks+welford {t['measure_seconds']:.3f}s, "
                     f"speed-up {t['measure_seconds']/o['measure_seconds']:.1f}x (target >= 10)")
        if o.get("peak_extra_bytes") is not None:
            line += (f"; peak extra GPU memory {o['peak_extra_bytes']/2**20:.1f} MiB for {o['images']} images, "
                     f"{o['peak_extra_bytes_quarter']/2**20:.1f} MiB for a quarter (target: equal)")
        if v1 and v1.get("measure_seconds"):
            line += (f"; with the v1 variance update {v1['measure_seconds']:.3f}s "
                     f"({v1['measure_seconds']/o['measure_seconds']:.2f}x the time with v2)")
        if o.get("graph_replays") is not None:
            line += f"; {o['graph_replays']} graph replays"
        if plain and plain.get("measure_seconds"):
            line += (f"; without graphs {plain['measure_seconds']:.3f}s "
                     f"({plain['measure_seconds']/o['measure_seconds']:.2f}x the time with them)")
        out.append(line)
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: lease_summary.py RAWDIR OUTDIR [--print]")
    raw, out = sys.argv[1], sys.argv[2]
    env, steps, load = load_env(raw), load_steps(raw), Jsonl(raw)
    try:
        lines, ratio_error = ratios(load), None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        # A benchmark whose JSON lacks a field: the step table still stands.
        lines, ratio_error = [], f"{type(e).__name__}: {e}"
    verdict = env.get("PHASE1", "running")
    failed = [s for s in steps if s["status"] not in ("ok", "skipped")]
    md = [f"# rotvar lease run ({env.get('MODE', '?')}): phase 1 {verdict}", ""]
    for k in ("STARTED", "DEVICE", "BINARY", "SIZES", "BUDGET", "PYTHON", "SANITIZER", "FINISHED"):
        if env.get(k):
            md.append(f"- {k.lower()}: {env[k]}")
    if env.get("PHASE1_REASON"):
        md.append(f"- phase 1 stopped the run: {env['PHASE1_REASON']}")
    md += ["", "| phase | step | status | seconds | limit | log | note |", "| - | - | - | - | - | - | - |"]
    md += [f"| {s['phase']} | {s['step']} | {s['status']} | {s['seconds']} | {s['limit']} | {s['log']} | {s['note']} |"
           for s in steps]
    md += ["", f"{len(steps)} steps, {len(failed)} not ok" + (": " + ", ".join(s["step"] for s in failed) if failed else ""), ""]
    if lines:
        md += ["## Against the baselines", "", "```", *lines, "```", ""]
    if ratio_error:
        md.append(f"The comparison stopped at a malformed benchmark line ({ratio_error}); see raw.tar.gz.")
    for name, n in load.bad.items():
        md.append(f"{name}: {n} lines that are not JSON (see raw.tar.gz)")
    md.append("Raw outputs (stdout .jsonl/.txt, stderr .err, steps.tsv, run.env): raw.tar.gz")
    text = "\n".join(md) + "\n"
    tmp = os.path.join(out, ".summary.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "summary.md"))
    with open(tmp, "w") as f:
        json.dump({"env": env, "steps": steps, "comparisons": lines, "malformed_lines": load.bad}, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    if "--print" in sys.argv:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
