#!/usr/bin/env bash
# Builds the LibTorch library with CMake and runs its C++ smoke test (ctest).
#
#   scripts/check_cmake_build.sh [PYTHON] [extra cmake configure args...]
#
# PYTHON (default python3) must have torch installed; its torch.utils.cmake_prefix_path
# is passed as CMAKE_PREFIX_PATH. The build goes to a temporary directory that is
# removed afterwards (set SGFUSED_KEEP_BUILD=1 to keep it). Builds with 2 jobs
# (SGFUSED_BUILD_JOBS overrides). Exits non-zero on any failure.
set -euo pipefail

PYTHON="${1:-python3}"
# an interpreter given by relative path must keep working after the cd's below
[[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
shift || true
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${SGFUSED_BUILD_JOBS:-2}"

PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/sgfused-cmake.XXXXXX")"
if [[ "${SGFUSED_KEEP_BUILD:-0}" == "1" ]]; then
  echo "check_cmake_build: keeping build directory $BUILD"
else
  trap 'rm -rf "$BUILD"' EXIT
fi

echo "check_cmake_build: torch cmake prefix $PREFIX"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$BUILD" --parallel "$JOBS"
cd "$BUILD"
ctest --output-on-failure
echo "check_cmake_build: OK"
