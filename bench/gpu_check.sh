#!/usr/bin/env bash
# On a GPU machine: build sgfused with the CUDA kernels for the local GPU, run the whole
# test suite with the CUDA and Triton backends live, run every benchmark on the GPU.
#
#   bash bench/gpu_check.sh [build|test|bench|all] [python]     (default: all python3)
#
# Stages can run in separate calls (a GPU lease caps one command's time): `build`
# builds the extension in place (sgfused/_C*.so, about a minute on 16 cores) and needs
# nvcc; `test` and `bench` use that build. Logs and a tarball of the GPU CSVs and plots
# (gpu_results.tar.gz) go to $OUT (default bench/results/gpu); CSVs and plots are
# also written to bench/results as every benchmark does.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
python="${2:-python3}"
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  local start=$SECONDS
  "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $((SECONDS - start)) s"
}

check() {
  "$python" -c "import sgfused, torch; print(torch.__version__, sgfused.build_info())" | tee "$out/build_info.txt"
  # The CUDA and Triton backends run on the GPU (conftest interprets Triton only without one).
  local workers=()
  "$python" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
  (cd python_tests && "$python" -m pytest -q -rs "${workers[@]}" . > "$out/tests_gpu.log" 2>&1) || true
  tail -25 "$out/tests_gpu.log"
}

bench() {
  # BENCH: the scripts to run (default all); BENCH_TIMEOUT: seconds each may take (default 1200)
  : > "$out/bench_gpu.log"
  for script in ${BENCH:-bench/bench_*.py}; do
    timeout "${BENCH_TIMEOUT:-1200}" "$python" "$script" --device cuda 2>&1 | tee -a "$out/bench_gpu.log" \
      | grep -E "^wrote|Error|error" || echo "$script: failed or timed out"
  done
  local name
  name="$("$python" -c "import torch, re; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")"
  tar czf "$out/gpu_results.tar.gz" $(ls bench/results/*_"$name".csv bench/results/*_"$name".png 2>/dev/null)
  echo "bench: results in $out/gpu_results.tar.gz"
}

case "$stage" in
  build) build ;;
  test) check ;;
  bench) bench ;;
  all) build; check; bench ;;
  *) echo "usage: bench/gpu_check.sh [build|test|bench|all] [python]" >&2; exit 2 ;;
esac
