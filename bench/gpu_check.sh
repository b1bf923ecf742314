#!/usr/bin/env bash
# On a GPU machine, in one call: build sgfused with the CUDA kernels for the local GPU,
# run the whole test suite with the CUDA and Triton backends live, run every benchmark
# on the GPU, and copy CSVs, plots and logs to $OUT (default bench/results).
# Usage: bash bench/gpu_check.sh [python]   (python must already have a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$python" -m pip install -q pybind11 ninja pytest numpy matplotlib tqdm triton setuptools wheel 2>&1 | tail -2 || true
FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$python" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -20
"$python" -c "import sgfused; print(sgfused.build_info())" | tee "$out/build_info.txt"
# Tests: CUDA and Triton backends run on the GPU (conftest only interprets Triton without one).
(cd python_tests && "$python" -m pytest -q . 2>&1 | tee "../$out/tests_gpu.log" | tail -15)
for bench in bench/bench_*.py; do
  "$python" "$bench" --device cuda 2>&1 | tee -a "$out/bench_gpu.log"
done
[ "$out" = bench/results ] || cp bench/results/*.csv bench/results/*.png "$out"/
echo "== summary"; grep -hE "passed|failed" "$out/tests_gpu.log" | tail -1; ls "$out"
