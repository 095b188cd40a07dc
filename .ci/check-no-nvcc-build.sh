#!/usr/bin/env bash
# A machine with no nvcc anywhere still builds a GPU-capable rotvar from kernels/generated/:
# build with NVCC, CUDA_PATH, CUDA_HOME unset and every nvcc directory off PATH, then check that
# `rotvar info` lists the embedded kernels from the committed files.
#   TARGET_DIR  cargo target dir (default: target/no-nvcc, a full dependency build the first time)
#   PROFILE     cargo profile (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${TARGET_DIR:-target/no-nvcc}"
PROFILE="${PROFILE:-dev}"
clean_path=$(tr ':' '\n' <<<"$PATH" | while read -r d; do [ -n "$d" ] && [ ! -e "$d/nvcc" ] && echo "$d"; done | paste -sd:)
run() { env -u NVCC -u CUDA_PATH -u CUDA_HOME -u ROTVAR_REQUIRE_NVCC PATH="$clean_path" "$@"; }
if run bash -c 'command -v nvcc' >/dev/null; then
    echo "check-no-nvcc-build: nvcc still on PATH" >&2
    exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! run cargo build --profile "$PROFILE" --target-dir "$TARGET_DIR" --bin rotvar >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
grep -E '^warning: rotvar|Finished' "$log" || true
dir=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
info=$(run "$TARGET_DIR/$dir/rotvar" info)
echo "$info" | sed -n '/^cuda kernels/,/^gpu/p'
want_hash=$(awk '$1 == "source_sha256" { print $2 }' kernels/generated/manifest.txt)
modules=$(ls kernels/*.cu | wc -l)
grep -q "^cuda kernels: committed kernels/generated/" <<<"$info" || { echo "no-nvcc build: kernels not from kernels/generated/" >&2; exit 1; }
grep -q "sources sha256 $want_hash" <<<"$info" || { echo "no-nvcc build: source hash differs from the manifest" >&2; exit 1; }
grep -q "^  $modules modules, [1-9][0-9]* kernels" <<<"$info" || { echo "no-nvcc build: expected $modules modules" >&2; exit 1; }
echo "check-no-nvcc-build: ok"
