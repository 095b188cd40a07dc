#!/usr/bin/env python3
"""Static kernel report for H100/H200 (sm_90): writes benches/KERNELS.md.

Per kernel, from `ptxas -v` on the committed PTX (kernels/generated/, which CI checks against
the sources): registers, spill bytes, stack, static shared memory. From the SASS of the committed
sm_90 cubins (cuobjdump -sass): instruction and FFMA counts, and for GEMM/conv kernels the FFMA
share and the FMA work per instruction (HMMA counted at its size) of their main loops. Occupancy under the launch configurations the backend
really uses: those recorded by ROTVAR_LAUNCH_LOG while rotvar runs every kernel on the emulator.

Exit status 1 (after writing the report) on any spill or any recorded launch an SM cannot hold:
too many threads, more shared memory than a block may have, or 0 blocks per SM.

Usage: kernel_report.py --rotvar target/release/rotvar [--out benches/KERNELS.md]
       kernel_report.py --launch-log FILE ...   (use recorded configurations instead of running)
       kernel_report.py --fmad-compare OLD_KERNELS_DIR   (print the -fmad cost table, see main)
Tools: $NVCC (ptxas and cuobjdump are found beside it); cuobjdump comes from the pip package
nvidia-cuda-cuobjdump (with nvdisasm, which it runs, from nvidia-cuda-nvdisasm), installed into
nvcc's venv by .ci/install-nvcc.sh.
"""

import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "kernels" / "generated"

# sm_90 (H100/H200) per-SM limits; CUDA C Programming Guide, compute capability 9.0.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, allocated per warp
MAX_REGS_PER_THREAD = 255
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_MAX_PER_BLOCK = 227 * 1024
# Above 48 KiB a block needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), which the
# backend never calls, so such a launch would fail.
SMEM_DEFAULT_MAX = 48 * 1024
SMEM_ALLOC_UNIT = 128
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)

# What the recorded launch configurations come from: every kernel the backend launches, the
# numbered variants kept for comparison too (with the environment variable that selects them).
RUNS = [
    ({}, ["selftest", "--device", "cuda-emu", "--steps", "2"]),
    ({}, ["bench", "conv", "--device", "cuda-emu", "--models", "lenet", "--batch-size", "8", "--steps", "1"]),
    ({}, ["bench", "gemm", "--device", "cuda-emu", "--models", "", "--steps", "1"]),
    ({"ROTVAR_VARIANCE_V1": "1"}, ["selftest", "--device", "cuda-emu", "--steps", "1"]),
    ({"ROTVAR_CONV_TILES": "v4"}, ["bench", "conv", "--device", "cuda-emu", "--models", "lenet", "--batch-size", "8", "--steps", "1"]),
    ({"ROTVAR_CONV_TILES": "v5"}, ["bench", "conv", "--device", "cuda-emu", "--models", "lenet", "--batch-size", "8", "--steps", "1"]),
    ({"ROTVAR_CONV_TILES": "v5"}, ["--precision", "tf32", "bench", "conv", "--device", "cuda-emu", "--models", "lenet", "--batch-size", "8", "--steps", "1"]),
    ({}, ["--precision", "tf32", "bench", "gemm", "--device", "cuda-emu", "--models", "", "--steps", "1"]),
    # The measure's replayed passes (variance_update_f64_v2_fed), and v1's fed twin.
    ({}, ["bench", "measure", "--device", "cuda-emu", "--models", "lenet", "--images", "8", "--angles", "2", "--batch-size", "4"]),
    ({"ROTVAR_VARIANCE_V1": "1"}, ["bench", "measure", "--device", "cuda-emu", "--models", "lenet", "--images", "8", "--angles", "2", "--batch-size", "4"]),
]
LOOP_KERNELS = ("gemm_", "conv2d_")


def tool(name):
    nvcc = os.environ.get("NVCC")
    if not nvcc:
        sys.exit("kernel_report: set NVCC (export NVCC=$(bash .ci/install-nvcc.sh))")
    p = Path(nvcc).with_name(name)
    if not p.is_file():
        sys.exit(f"kernel_report: {p} missing; install it with .ci/install-nvcc.sh")
    return str(p)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"kernel_report: {' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def ptxas_resources(ptx):
    """{kernel: {regs, spill_st, spill_ld, stack, smem}} from ptxas -v on one PTX file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = run([tool("ptxas"), "-v", "-arch=sm_90", "-O3", "-o", f"{tmp}/x.cubin", str(ptx)], cwd=tmp)
    res, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return res


def launch_bounds(ptx_text):
    """{kernel: max threads per block} from the PTX `.maxntid` of __launch_bounds__ kernels."""
    bounds, cur = {}, None
    for line in ptx_text.splitlines():
        m = re.match(r"\.visible \.entry (\w+)\(", line.strip())
        if m:
            cur = m.group(1)
        m = re.match(r"\.(maxntid|reqntid) (\d+), (\d+), (\d+)", line.strip())
        if m and cur:
            bounds[cur] = int(m.group(2)) * int(m.group(3)) * int(m.group(4))
    return bounds


def sass(cubin):
    """{kernel: [(address, opcode), ...]} from cuobjdump -sass."""
    out = run([tool("cuobjdump"), "-sass", str(cubin)])
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\w+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def opcode(ins):
    """`@!P0 FFMA.FTZ R1, ...` -> `FFMA`."""
    parts = ins.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else ""


# FMAs per warp-wide instruction, in units of one FFMA (32 lanes x 1 FMA): HMMA.1688 (TF32,
# 16x8x8) does 1024, HMMA.16816 (BF16, 16x8x16) 2048.
HMMA_WORK = {"1688": 32, "16816": 64}


def inner_loops(code):
    """Innermost loops (body between a backward branch's target and the branch) as
    (start, end, instructions, ffma, {hmma shape: count}), NOPs excluded."""
    loops = []
    for addr, ins in code:
        if opcode(ins) == "BRA":
            t = re.search(r"(0x[0-9a-f]+)\s*$", ins)
            target = int(t.group(1), 16) if t else None
            if target is not None and target < addr:
                loops.append((target, addr))
    inner = [l for l in loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    out = []
    for lo, hi in sorted(inner):
        body = [i for a, i in code if lo <= a <= hi and opcode(i) != "NOP"]
        hmma = {}
        for i in body:
            m = re.search(r"HMMA\.(\d+)", i)
            if opcode(i) == "HMMA" and m:
                hmma[m.group(1)] = hmma.get(m.group(1), 0) + 1
        out.append((lo, hi, len(body), sum(opcode(i) == "FFMA" for i in body), hmma))
    return out


def loop_work(loop):
    """FMA work of a loop body in FFMA units."""
    _, _, _, ffma, hmma = loop
    return ffma + sum(HMMA_WORK.get(shape, 0) * n for shape, n in hmma.items())


def main_loops(code):
    """The loops worth reporting: every innermost loop that issues HMMA (a tensor-core kernel
    holds one per precision), else the one with the most FFMA work; [] without a loop."""
    loops = inner_loops(code)
    mma = [l for l in loops if l[4]]
    if mma:
        return mma
    best = max(loops, key=lambda l: (loop_work(l), l[2], -l[0]), default=None)
    return [best] if best else []


def occupancy(r, block, dyn):
    """(blocks per SM, limiting factor, problems) for one launch of a kernel with resources r."""
    problems = []
    threads = block[0] * block[1] * block[2]
    if threads == 0 or threads > MAX_THREADS_PER_BLOCK or any(b > m for b, m in zip(block, MAX_BLOCK_DIM)):
        problems.append(f"block {block} exceeds the per-block thread limits")
    if r["bound"] and threads > r["bound"]:
        problems.append(f"{threads} threads > __launch_bounds__ {r['bound']}")
    smem = r["smem"] + dyn
    if smem > SMEM_MAX_PER_BLOCK:
        problems.append(f"{smem} B shared memory > {SMEM_MAX_PER_BLOCK} B per block")
    elif smem > SMEM_DEFAULT_MAX:
        problems.append(f"{smem} B shared memory > 48 KiB without the opt-in attribute")
    warps = max(1, -(-threads // 32))
    regs_warp = -(-max(r["regs"], 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    smem_block = -(-(smem + SMEM_RESERVED_PER_BLOCK) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    limits = {
        "regs": (REGS_PER_SM // regs_warp) // warps,
        "warps": MAX_WARPS_PER_SM // warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "smem": SMEM_PER_SM // smem_block,
    }
    if r["regs"] > MAX_REGS_PER_THREAD:
        problems.append(f"{r['regs']} registers per thread > {MAX_REGS_PER_THREAD}")
    blocks = min(limits.values())
    if blocks == 0 and not problems:
        problems.append("0 blocks fit on an SM")
    # Full occupancy is named after the warp limit, whatever else would also allow it.
    why = next(k for k in ("warps", "blocks", "regs", "smem") if limits[k] == blocks)
    return blocks, warps, why, problems


def collect_launches(rotvar):
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "launches.txt"
        for extra, args in RUNS:
            env = dict(os.environ, ROTVAR_LAUNCH_LOG=str(log), **extra)
            run([rotvar, *args], env=env, cwd=tmp)
        return parse_launch_log(log.read_text())


def parse_launch_log(text):
    seen = set()
    for line in text.splitlines():
        f = line.split()
        if len(f) != 5:
            sys.exit(f"kernel_report: malformed launch log line {line!r}")
        seen.add((f[0], (int(f[1]), int(f[2]), int(f[3])), int(f[4])))
    return sorted(seen)


def module_data(mod):
    ptx = GEN / f"{mod}.ptx"
    res = ptxas_resources(ptx)
    bounds = launch_bounds(ptx.read_text())
    code = sass(GEN / f"{mod}.sm_90.cubin")
    out = {}
    for k in sorted(set(res) | set(code)):
        if k not in res or k not in code:
            sys.exit(f"kernel_report: {mod}: {k} missing from ptxas -v or from the SASS")
        ops = [opcode(i) for _, i in code[k] if opcode(i) != "NOP"]
        out[k] = dict(res[k], module=mod, bound=bounds.get(k), instr=len(ops),
                      ffma=sum(o == "FFMA" for o in ops), loops=main_loops(code[k]) if k.startswith(LOOP_KERNELS) else [])
    return out


def manifest_field(key):
    for line in (GEN / "manifest.txt").read_text().splitlines():
        if line.startswith(key + " "):
            return line.split(" ", 1)[1]
    sys.exit(f"kernel_report: {key} missing from kernels/generated/manifest.txt")


def all_kernels():
    mods = sorted(p.name[: -len(".ptx")] for p in GEN.glob("*.ptx"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        parts = list(ex.map(module_data, mods))
    return {k: v for part in parts for k, v in part.items()}


def render(kernels, launches):
    problems = []
    L = []
    L.append("# Static kernel report: H100/H200 (sm_90)")
    L.append("")
    L.append("Generated by `benches/kernel_report.py` (run by `.ci/gen-kernels.sh`; CI regenerates it and fails")
    L.append("when this file differs, on any spill, or on any launch an SM cannot hold). Do not edit.")
    L.append("")
    L.append(f"- Kernels: `kernels/generated/` (sources sha256 `{manifest_field('source_sha256')[:16]}…`,")
    L.append(f"  nvcc `{manifest_field('nvcc')}`, `{manifest_field('nvcc_flags')}`,")
    L.append(f"  ptxas `{manifest_field('ptxas_flags')}`).")
    L.append("- Registers, spills, stack, static shared memory: `ptxas -v -arch=sm_90`. Instruction counts: SASS")
    L.append("  (`cuobjdump -sass`), NOPs excluded.")
    L.append("- Launch configurations: every distinct (kernel, block, dynamic shared memory) recorded with")
    L.append("  `ROTVAR_LAUNCH_LOG` during " + "; ".join(f"`{''.join(f'{k}={v} ' for k, v in e.items())}rotvar {shlex.join(a)}`" for e, a in RUNS) + ".")
    L.append(f"- SM limits (compute capability 9.0): {REGS_PER_SM} registers (allocated per warp in units of")
    L.append(f"  {REG_ALLOC_UNIT}), {MAX_WARPS_PER_SM} warps, {MAX_BLOCKS_PER_SM} blocks, {SMEM_PER_SM // 1024} KiB shared memory")
    L.append(f"  ({SMEM_RESERVED_PER_BLOCK} B reserved per block, {SMEM_ALLOC_UNIT} B allocation unit, at most")
    L.append(f"  {SMEM_MAX_PER_BLOCK // 1024} KiB per block, 48 KiB without the opt-in the backend never sets);")
    L.append(f"  {MAX_THREADS_PER_BLOCK} threads per block.")
    L.append("")
    L.append("## Resources per kernel")
    L.append("")
    L.append("| module | kernel | registers | spill stores / loads (B) | stack (B) | static smem (B) | launch bound | SASS instructions | FFMA |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, k in sorted(kernels.items(), key=lambda kv: (kv[1]["module"], kv[0])):
        if k["spill_st"] or k["spill_ld"]:
            problems.append(f"{name}: spills {k['spill_st']} B stores, {k['spill_ld']} B loads")
        L.append(f"| {k['module']} | `{name}` | {k['regs']} | {k['spill_st']} / {k['spill_ld']} | {k['stack']} | "
                 f"{k['smem']} | {k['bound'] or '-'} | {k['instr']} | {k['ffma']} |")
    L.append("")
    L.append("## Occupancy under the launch configurations the backend uses")
    L.append("")
    L.append("Blocks per SM = the smallest of the register, shared-memory, warp and block limits; occupancy =")
    L.append("resident warps / 64. `limit` names the binding resource.")
    L.append("")
    L.append("| kernel | block | dynamic smem (B) | warps/block | blocks/SM | limit | occupancy |")
    L.append("|---|---|---|---|---|---|---|")
    launched = set()
    for name, block, dyn in launches:
        if name not in kernels:
            problems.append(f"{name}: launched but not in kernels/generated/")
            continue
        launched.add(name)
        blocks, warps, why, probs = occupancy(kernels[name], block, dyn)
        problems += [f"{name} block {block[0]}x{block[1]}x{block[2]}, {dyn} B dynamic smem: {p}" for p in probs]
        occ = f"{100 * blocks * warps // MAX_WARPS_PER_SM}%"
        L.append(f"| `{name}` | {block[0]}×{block[1]}×{block[2]} | {dyn} | {warps} | {blocks} | {why} | {occ} |")
    missing = sorted(set(kernels) - launched)
    L.append("")
    L.append("Not launched in the recorded runs: " + (", ".join(f"`{m}`" for m in missing) if missing else "none") + ".")
    L.append("")
    L.append("## Main loops of the GEMM and convolution kernels")
    L.append("")
    L.append("Loops are found by backward branches in the SASS. For a CUDA-core kernel the row is the innermost")
    L.append("loop with the most FFMA work; a tensor-core kernel (`*_tc*`) gets one row per innermost loop that")
    L.append("issues HMMA: one per precision, in the order of their addresses (TF32 issues 8 HMMA.1688 per 16-deep")
    L.append("slice and warp on a 64-row tile, 3xTF32 24, BF16 4 HMMA.16816). FMA share = FFMA / instructions")
    L.append("(NOPs excluded). Work/instr = (FFMA + 32·HMMA.1688 + 64·HMMA.16816) / instructions: FMAs per")
    L.append("instruction issued, in units of one FFMA, so CUDA-core and tensor-core loops compare (3xTF32's")
    L.append("useful work is a third of it).")
    L.append("")
    L.append("| kernel | loop (SASS bytes) | instructions | FFMA | HMMA | FMA share | work/instr |")
    L.append("|---|---|---|---|---|---|---|")
    for name, k in sorted(kernels.items()):
        if not name.startswith(LOOP_KERNELS):
            continue
        if not k["loops"]:
            L.append(f"| `{name}` | no loop | - | - | - | - | - |")
            continue
        for loop in k["loops"]:
            lo, hi, n, f, hmma = loop
            h = ", ".join(f"{c}× .{shape}" for shape, c in sorted(hmma.items())) or "-"
            L.append(f"| `{name}` | 0x{lo:04x}–0x{hi:04x} | {n} | {f} | {h} | {100 * f / n:.0f}% | {loop_work(loop) / n:.2f} |")
    L.append("")
    L.append("## Problems")
    L.append("")
    if problems:
        L.extend(f"- {p}" for p in problems)
    else:
        L.append("None.")
    L.append("")
    return "\n".join(L), problems


def fmad_compare(old_dir):
    """Per kernel: registers / SASS instructions / FFMA of OLD_DIR's sources compiled the old way
    (-fmad=true, nvcc's default) vs kernels/generated (the build's flags). Prints markdown."""
    old = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted(Path(old_dir).glob("*.cu")):
            ptx, cubin = f"{tmp}/{cu.stem}.ptx", f"{tmp}/{cu.stem}.cubin"
            run([os.environ["NVCC"], "-ptx", "-arch=compute_90", "-O3", "--std=c++17", "-lineinfo", "-fmad=true",
                 "-I", str(old_dir), "-o", ptx, str(cu)])
            run([tool("ptxas"), "-arch=sm_90", "-O3", "-o", cubin, ptx])
            res = ptxas_resources(Path(ptx))
            for k, code in sass(Path(cubin)).items():
                ops = [opcode(i) for _, i in code if opcode(i) != "NOP"]
                old[k] = (res[k]["regs"], len(ops), sum(o == "FFMA" for o in ops))
    new = all_kernels()
    print("| kernel | registers old → new | SASS instructions old → new | FFMA old → new |")
    print("|---|---|---|---|")
    for k in sorted(new, key=lambda k: (new[k]["module"], k)):
        n = new[k]
        o = old.get(k)
        if o is None:
            print(f"| `{k}` | new kernel: {n['regs']} | {n['instr']} | {n['ffma']} |")
            continue
        mark = "" if o == (n["regs"], n["instr"], n["ffma"]) else " **≠**"
        print(f"| `{k}`{mark} | {o[0]} → {n['regs']} | {o[1]} → {n['instr']} | {o[2]} → {n['ffma']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rotvar", help="rotvar binary whose launches are recorded")
    ap.add_argument("--launch-log", help="a ROTVAR_LAUNCH_LOG file to use instead of running rotvar")
    ap.add_argument("--out", default=str(ROOT / "benches" / "KERNELS.md"))
    ap.add_argument("--fmad-compare", metavar="OLD_KERNELS_DIR")
    a = ap.parse_args()
    if a.fmad_compare:
        return fmad_compare(a.fmad_compare)
    if a.launch_log:
        launches = parse_launch_log(Path(a.launch_log).read_text())
    elif a.rotvar:
        launches = collect_launches(str(Path(a.rotvar).resolve()))
    else:
        sys.exit("kernel_report: give --rotvar BINARY or --launch-log FILE")
    text, problems = render(all_kernels(), launches)
    Path(a.out).write_text(text)
    print(f"kernel_report: wrote {a.out}", file=sys.stderr)
    if problems:
        print("kernel_report: " + "\n  ".join(["problems:", *problems]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
