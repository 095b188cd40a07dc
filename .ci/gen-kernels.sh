#!/usr/bin/env bash
# Regenerates everything derived from the kernel sources, with the pinned nvcc:
#   kernels/generated/  PTX + sm_90 cubin per module and manifest.txt (build/gen_kernels.rs, the
#                       same compiler calls as build.rs), for builds on machines without nvcc;
#   benches/KERNELS.md  the static kernel report (benches/kernel_report.py), which needs a
#                       release build of rotvar for the launch configurations.
# Run it after any change to kernels/*.cu, kernels/*.cuh or build/nvcc.rs, and commit the result.
#
#   .ci/gen-kernels.sh            regenerate in place
#   .ci/gen-kernels.sh --check    regenerate into a scratch folder and fail if the committed files
#                                 differ (CI); also fails on spills or launches an SM cannot hold
#   ONLY=kernels|report           do one half only
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
ONLY="${ONLY:-}"

if [ -z "${NVCC:-}" ]; then
    NVCC=$(bash .ci/install-nvcc.sh)
fi
export NVCC
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ "$ONLY" != report ]; then
    echo "== kernels/generated (nvcc: $NVCC)" >&2
    rustc --edition 2021 -O -o "$tmp/gen_kernels" build/gen_kernels.rs
    "$tmp/gen_kernels" kernels "$tmp/generated"
    # The manifest's hashes come from gen_kernels' own SHA-256: check them with sha256sum.
    (cd "$tmp/generated" && awk '$1 == "module" { print $4 "  " $2 ".ptx"; print $6 "  " $2 ".sm_90.cubin" }' \
        manifest.txt | sha256sum --check --quiet)
    if [ $CHECK = 1 ]; then
        if ! diff -r kernels/generated "$tmp/generated" >"$tmp/diff.txt"; then
            head -n 20 "$tmp/diff.txt" >&2
            echo "kernels/generated/ is not what the pinned nvcc makes of the sources: run .ci/gen-kernels.sh and commit" >&2
            exit 1
        fi
        echo "kernels/generated/ matches the sources" >&2
    else
        rm -rf kernels/generated
        mv "$tmp/generated" kernels/generated
        echo "wrote kernels/generated/" >&2
    fi
fi

if [ "$ONLY" != kernels ]; then
    echo "== benches/KERNELS.md" >&2
    args=(--rotvar target/release/rotvar --out "$tmp/KERNELS.md")
    cargo build --release --quiet
    rc=0
    python3 benches/kernel_report.py "${args[@]}" || rc=$?
    [ $rc = 0 ] || [ $rc = 1 ] || exit $rc
    if [ $CHECK = 1 ]; then
        if ! diff -u benches/KERNELS.md "$tmp/KERNELS.md" >"$tmp/diff.txt"; then
            head -n 40 "$tmp/diff.txt" >&2
            echo "benches/KERNELS.md is out of date: run .ci/gen-kernels.sh and commit" >&2
            exit 1
        fi
        echo "benches/KERNELS.md is up to date" >&2
    else
        cp "$tmp/KERNELS.md" benches/KERNELS.md
        echo "wrote benches/KERNELS.md" >&2
    fi
    # 1: the report lists problems (a spill, a launch an SM cannot hold).
    [ $rc = 0 ] || { echo "benches/KERNELS.md lists problems (see its last section)" >&2; exit 1; }
fi
