#!/usr/bin/env bash
# Compiles sgfused with its CUDA kernels through setup.py and checks that they
# were built and registered. Needs nvcc, not a GPU.
#
#   scripts/check_cuda_build.sh [PYTHON]
#
# PYTHON (default python3) must have a CUDA build of torch, pybind11 and ninja.
# CUDA_HOME defaults to /usr/local/cuda; the nvidia/cu13/include folder of that
# torch install (cusparse.h and friends) is added to CPATH. Builds for
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0") with MAX_JOBS (default 2) jobs, into a
# temporary directory removed afterwards (SGFUSED_KEEP_BUILD=1 keeps it), so
# neither the repository nor the Python environment is modified. Exits non-zero
# if any source fails to compile or the CUDA kernels are not registered.
set -euo pipefail

PYTHON="${1:-python3}"
# an interpreter given by relative path must keep working after the cd's below
[[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

NVIDIA_INCLUDE="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include"))')"
if [[ -d "$NVIDIA_INCLUDE" ]]; then
  export CPATH="$NVIDIA_INCLUDE${CPATH:+:$CPATH}"
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/sgfused-cuda.XXXXXX")"
if [[ "${SGFUSED_KEEP_BUILD:-0}" == "1" ]]; then
  echo "check_cuda_build: keeping build directory $BUILD"
else
  trap 'rm -rf "$BUILD"' EXIT
fi

echo "check_cuda_build: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
(cd "$ROOT" && "$PYTHON" setup.py build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib") 2>&1 | tee "$BUILD/build.log"

# A copy of the Python package next to the freshly built extension.
mkdir -p "$BUILD/pkg"
cp -r "$ROOT/sgfused" "$BUILD/pkg/"
cp "$BUILD"/lib/sgfused/_C*.so "$BUILD/pkg/sgfused/"

if grep -E "csrc/cuda/.*warning" "$BUILD/build.log"; then
  echo "check_cuda_build: the CUDA sources compiled with warnings (above)"
fi

cd "$BUILD/pkg"
SGFUSED_SRC="$ROOT" PYTHONPATH="$BUILD/pkg" "$PYTHON" - <<'EOF'
import torch

import sgfused

info = sgfused.build_info()
print("check_cuda_build: build_info", info)
assert sgfused.__file__.startswith(__import__("os").getcwd()), sgfused.__file__
assert "cuda" in info["backends"], f"the CUDA kernels were not compiled: {info}"
import glob, os
# every csrc/cuda/<op>.cu must register CUDA kernels for <op>_forward and <op>_backward
for source in sorted(glob.glob(os.path.join(os.environ["SGFUSED_SRC"], "csrc/cuda/*.cu"))):
    name = os.path.basename(source)[: -len(".cu")]
    for op in (f"{name}_forward", f"{name}_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sgfused::{op}", "CUDA"), f"no CUDA kernel for {op}"
        print("check_cuda_build: CUDA kernel registered for", op)
EOF
echo "check_cuda_build: OK"
