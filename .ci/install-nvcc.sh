#!/usr/bin/env bash
# Installs (or reuses) a pip-packaged nvcc pinned to CUDA 13.0, with ptxas and cuobjdump beside
# it, and prints the path of nvcc on stdout, and nothing else, so CI can do:
#     export NVCC=$(bash .ci/install-nvcc.sh)
# Everything else (pip output, hints) goes to stderr.
#
# Why pinned: an unpinned nvidia-nvvm emits PTX ISA 9.5, which the CUDA 13.0
# driver on the target H100 rejects; 13.0.88 emits 9.0.
#
# Env: ROTVAR_NVCC_VENV (venv dir, default ~/.cache/rotvar/nvcc-venv),
#      PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail
exec 3>&1 1>&2

VENV="${ROTVAR_NVCC_VENV:-$HOME/.cache/rotvar/nvcc-venv}"
PY="${PYTHON:-python3}"
# cuobjdump (SASS for benches/kernel_report.py) only disassembles: PyPI has no 13.0 build, the
# oldest, 13.2.51, is pinned; it reads the cubins of ptxas 13.0 unchanged. It runs nvdisasm,
# a package of its own (without it: "Could not find executable file 'nvdisasm'").
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88
      nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51)

find_nvcc() {
    local p
    for p in "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

pins_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    local frozen pkg
    frozen="$("$VENV/bin/python" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')" || return 1
    for pkg in "${PKGS[@]}"; do
        grep -qxF "$pkg" <<<"$frozen" || return 1
    done
}

if pins_ok && find_nvcc >/dev/null; then
    echo "install-nvcc: reusing $VENV"
else
    echo "install-nvcc: installing ${PKGS[*]} into $VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$(dirname "$VENV")"
        "$PY" -m venv "$VENV"
    fi
    # Installing with == pins also repairs a venv where something upgraded nvvm.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}"
    pins_ok || { echo "install-nvcc: pinned versions not present after install" >&2; exit 1; }
fi

NVCC="$(find_nvcc)" || { echo "install-nvcc: nvcc not found under $VENV" >&2; exit 1; }
if ! "$NVCC" --version | grep -q "release 13\.0,"; then
    echo "install-nvcc: $NVCC is not CUDA 13.0:" >&2
    "$NVCC" --version >&2
    exit 1
fi

# Smoke test: the toolchain must produce PTX the target driver accepts.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.f; }\n' >"$tmp/k.cu"
"$NVCC" -ptx -arch=compute_90 -o "$tmp/k.ptx" "$tmp/k.cu"
ver="$(awk '$1 == ".version" { print $2; exit }' "$tmp/k.ptx")"
case "$ver" in
    [0-8].* | 9.0) ;;
    *) echo "install-nvcc: nvcc emits PTX ISA '$ver' (> 9.0); pin nvidia-nvvm==13.0.88" >&2; exit 1 ;;
esac

echo "install-nvcc: nvcc OK (CUDA 13.0, PTX ISA $ver). To use it interactively:"
echo "    export PATH=\"$(dirname "$NVCC"):\$PATH\" NVCC=\"$NVCC\""
echo "$NVCC" >&3
