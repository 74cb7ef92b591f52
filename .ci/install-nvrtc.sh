#!/usr/bin/env bash
# Installs NVIDIA's NVRTC (CUDA 13, libnvrtc.so.13) from PyPI into a cache directory of the repo,
# not into the system Python, so that the CUDA kernels can be compiled to PTX on a machine without
# a GPU or a CUDA toolkit (tests/suite/nvrtc.rs, `distillation::backend::cuda::compile_all_kernels`).
#
#   lib=$(bash .ci/install-nvrtc.sh | tail -n 1)
#   LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DISTILLATION_REQUIRE=nvrtc \
#       cargo test --test suite nvrtc::
#
# cudarc (feature dynamic-loading, cuda-13000) dlopen()s the names libnvrtc.so, libnvrtc.so.13, ...,
# libnvrtc.so.1; the wheel ships libnvrtc.so.13 (and libnvrtc-builtins.so.13.0 beside it), so
# LD_LIBRARY_PATH pointing at the wheel's lib directory is enough. A libnvrtc.so symlink is added
# as well for other loaders.
#
# Also installs ptxas (from the nvidia-cuda-nvcc wheel, ~37 MB download, without its dependencies)
# unless NVRTC_SKIP_PTXAS=1, so that `ptxas -arch=sm_90 -v kernel.ptx` reports registers and spills.
# The ptxas directory is printed on the line before the last one ("ptxas: DIR").
#
# Environment: NVRTC_CACHE (default <repo>/.cache/nvrtc), NVRTC_VERSION (default 13.0.88: PTX from
# NVRTC 13.0 loads on any driver of the CUDA 13 series), PYTHON (default python3).
# Idempotent: nothing is downloaded when the library is already there. The last line of the output
# is the directory holding libnvrtc.so.13.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${NVRTC_CACHE:-$repo/.cache/nvrtc}"
version="${NVRTC_VERSION:-13.0.88}"
python="${PYTHON:-python3}"
lib="$cache/nvidia/cu13/lib"
bin="$cache/nvidia/cu13/bin"

pip_install() {
    # --target keeps everything under $cache; --no-deps because the wheels' dependencies (runtime,
    # nvvm, crt) are not needed to compile to PTX.
    "$python" -m pip install --disable-pip-version-check --no-input --quiet --no-deps \
        --upgrade --target "$cache" "$@" >&2
}

mkdir -p "$cache"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
    echo "installing nvidia-cuda-nvrtc==$version into $cache" >&2
    pip_install "nvidia-cuda-nvrtc==$version"
else
    echo "nvidia-cuda-nvrtc already in $cache" >&2
fi
if [ ! -e "$lib/libnvrtc.so.13" ]; then
    echo "error: $lib/libnvrtc.so.13 missing after the install" >&2
    exit 1
fi
[ -e "$lib/libnvrtc.so" ] || ln -s libnvrtc.so.13 "$lib/libnvrtc.so"

if [ "${NVRTC_SKIP_PTXAS:-0}" != 1 ]; then
    if [ ! -x "$bin/ptxas" ]; then
        echo "installing ptxas (nvidia-cuda-nvcc==$version) into $cache" >&2
        # A second --target install into the same directory would replace the shared nvidia/
        # folder, so the nvcc wheel goes to its own directory and only ptxas is copied over.
        tmp="$(mktemp -d)"
        if "$python" -m pip install --disable-pip-version-check --no-input --quiet --no-deps \
            --target "$tmp" "nvidia-cuda-nvcc==$version" >&2; then
            mkdir -p "$bin"
            cp "$tmp/nvidia/cu13/bin/ptxas" "$bin/ptxas"
            chmod +x "$bin/ptxas"
        else
            echo "warning: could not install ptxas (optional)" >&2
        fi
        rm -rf "$tmp"
    fi
    [ -x "$bin/ptxas" ] && echo "ptxas: $bin"
fi

echo "$lib"
