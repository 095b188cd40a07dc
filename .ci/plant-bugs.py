#!/usr/bin/env python3
"""Plants realistic bugs in the real kernels, one at a time, and checks that `cargo test` fails
with a sanitizer report naming the kernel (issue 11's acceptance). Slow (a rebuild and one test
binary per bug, ~2-5 min each); not part of CI.

Usage, from the repository root of a clean checkout (it edits kernels/ and restores them with
`git checkout`): python3 .ci/plant-bugs.py
"""
import os
import re
import subprocess
import sys

PLANTS = [
    ("conv weight loader reads one row past w", "kernels/conv.cu",
     "v[j] = (kr < kend && m < M) ? __ldg(w + (long long)m * ld + kr) : 0.f;",
     "v[j] = (kr < kend && m <= M) ? __ldg(w + (long long)m * ld + kr) : 0.f;", "conv_kernels_emulated"),
    ("elementwise kernels write one past the end", "kernels/elementwise.cu",
     "for (long long i = n4 * 4 + tid; i < n; i += stride) f1(i);",
     "for (long long i = n4 * 4 + tid; i <= n; i += stride) f1(i);", "kernels_emulated"),
    ("batch-norm block sum without its trailing barrier", "kernels/norm.cu",
     "    // sa/sb are rewritten by the next call.\n    __syncthreads();",
     "    // sa/sb are rewritten by the next call.", "norm_loss_kernels_emulated"),
    ("atomicAdd replaced by +=", "kernels/emu_selftest.cu",
     "atomicAdd(fsum, (float)i);", "*fsum += (float)i;", "emu_conformance"),
    ("full-mask shuffle reached by half a warp", "kernels/loss.cu",
     "    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);",
     "    if ((threadIdx.x & 31u) < 16u)\n"
     "    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);",
     "norm_loss_kernels_emulated"),
]

env = dict(os.environ)
for v in ("NVCC", "ROTVAR_REQUIRE_NVCC"):  # the emulator is what is tested; skip nvcc
    env.pop(v, None)
caught = 0
for name, path, old, new, test in PLANTS:
    src = open(path).read()
    if old not in src:
        sys.exit(f"plant-bugs: {path} no longer contains the line to break for '{name}'; update this script")
    open(path, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run(["cargo", "test", "--test", test], capture_output=True, text=True, env=env)
    finally:
        subprocess.run(["git", "checkout", "--", path], check=True)
    out = r.stdout + r.stderr
    reports = [l.strip() for l in out.splitlines() if re.search(r"(memcheck|racecheck|initcheck|synccheck):", l)]
    ok = r.returncode != 0 and reports
    caught += bool(ok)
    print(f"{'CAUGHT' if ok else 'MISSED'}: {name} ({path}; cargo test --test {test} exit {r.returncode})")
    for l in reports[:3]:
        print("    " + l[:300])
print(f"{caught} of {len(PLANTS)} planted bugs caught")
sys.exit(0 if caught == len(PLANTS) else 1)
