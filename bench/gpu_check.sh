#!/usr/bin/env bash
# On a GPU machine: build sgfused with the CUDA kernels for the local GPU, run the whole
# test suite with the CUDA and Triton backends live, run every GPU benchmark, and print
# the GPU speed targets against what was measured.
#
#   bash bench/gpu_check.sh [build|test|bench|targets|all] [python]     (default: all python3)
#
# Time plan: a device lease allows 10 minutes a call and about 15 in all, starts included,
# so `all` keeps within GPU_CHECK_SECONDS (default 540) of its start, whatever is slow; the
# machine stays warm 30 s after a call, so a second call at once (a stage, or BENCH=the benches
# not reached) can use the rest of the lease:
#   build    the extension in place (sgfused/_C*.so; needs nvcc), untimed;
#   test     the test suite, the files that run the GPU backends first, stopped (SIGINT, so
#            pytest still prints its summary) after TEST_SECONDS (default 120) or at the
#            deadline; the log says how far it got;
#   bench    the GPU benchmarks, the op benchmarks of the targets first (BENCH overrides the
#            list), each given at most BENCH_SECONDS (default 180, so that one slow benchmark
#            cannot starve the rest) and never past the deadline less 20 s, and named in the log
#            if it is stopped; a stopped benchmark still writes the rows it measured. This
#            GPU's CSVs and plots from before (committed runs) are moved to
#            bench/results/before_gpu_check first, so that nothing older is read as measured now;
#            the tarball of the new ones is rewritten after each benchmark;
#   targets  bench/gpu_targets.py: one line per target with the measured figure (printed last).
# Rows record SGFUSED_COMMIT as their commit (a device machine's copy of the tree has no git:
# run it as `SGFUSED_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh all`).
# Logs and gpu_results.tar.gz go to $OUT (default bench/results/gpu); CSVs and plots are
# also written to bench/results as every benchmark does.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
python="${2:-python3}"
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SGFUSED_COMMIT="${SGFUSED_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
# the benchmarks that run on a GPU, in the order of the targets (distributed and search are CPU benches)
default_benches="cross_attention pairwise_similarity hardest_negative sgraf mpsm sgfn sgm max_sim cmsei"
# the test files that exercise the CUDA and Triton backends; the rest of the suite runs after them
gpu_tests="test_cross_attention.py test_pairwise_similarity.py test_hardest_negative.py test_max_sim.py \
  test_max_sim_tiles.py test_ops_reliability.py test_build_and_dispatch.py test_model_sgraf.py test_model_mpsm.py \
  test_model_sgfn.py test_model_sgm.py test_model_cmsei.py"

left() { echo $((deadline - SECONDS)); }

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  local nvcc
  nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}" FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  local start=$SECONDS
  "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $((SECONDS - start)) s"
}

check() {
  "$python" -c "import sgfused, torch; print(torch.__version__, sgfused.build_info())" | tee "$out/build_info.txt"
  # The CUDA and Triton backends run on the GPU (conftest interprets Triton only without one).
  local workers=() files=() f limit=$((${TEST_SECONDS:-120} < $(left) - 60 ? ${TEST_SECONDS:-120} : $(left) - 60))
  if ((limit < 10)); then echo "tests: not run (deadline)" | tee "$out/tests_gpu.log"; return; fi
  "$python" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
  for f in $gpu_tests; do files+=("$f"); done
  for f in $(cd python_tests && ls test_*.py); do [[ " $gpu_tests " == *" $f "* ]] || files+=("$f"); done
  local start=$SECONDS rc=0
  (cd python_tests && timeout -s INT -k 20 "$limit" "$python" -m pytest -q -rs "${workers[@]}" "${files[@]}" > "$out/tests_gpu.log" 2>&1) || rc=$?
  [[ $rc == 124 ]] && echo "tests: stopped after ${limit} s (TEST_SECONDS); tests_gpu.log has what ran" | tee -a "$out/tests_gpu.log"
  echo "tests: $((SECONDS - start)) s"
  tail -25 "$out/tests_gpu.log"
}

bench() {
  : > "$out/bench_gpu.log"
  local name bench limit start rc
  name="$("$python" -c "import torch, re; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")"
  mkdir -p bench/results/before_gpu_check
  for f in bench/results/*_"$name".csv bench/results/*_"$name".png; do
    [[ -e $f ]] && mv "$f" bench/results/before_gpu_check/ && echo "moved aside (from before): $f" | tee -a "$out/bench_gpu.log"
  done
  for bench in ${BENCH:-$default_benches}; do
    limit=$(($(left) - 20 < ${BENCH_SECONDS:-180} ? $(left) - 20 : ${BENCH_SECONDS:-180}))
    if ((limit < 10)); then echo "$bench: not run (deadline)" | tee -a "$out/bench_gpu.log"; continue; fi
    start=$SECONDS rc=0
    timeout -k 10 "$limit" "$python" "bench/bench_$bench.py" --device cuda >> "$out/bench_gpu.log" 2>&1 || rc=$?
    case $rc in
      0) echo "$bench: $((SECONDS - start)) s" | tee -a "$out/bench_gpu.log" ;;
      124) echo "$bench: stopped after $((SECONDS - start)) s (BENCH_SECONDS or the deadline)" | tee -a "$out/bench_gpu.log" ;;
      *) echo "$bench: failed (exit $rc), see bench_gpu.log" | tee -a "$out/bench_gpu.log" ;;
    esac
    tar czf "$out/gpu_results.tar.gz" $(ls bench/results/*_"$name".csv bench/results/*_"$name".png 2>/dev/null) 2>/dev/null || true
  done
  echo "bench: results in $out/gpu_results.tar.gz"
}

targets() {
  "$python" bench/gpu_targets.py | tee "$out/targets.txt"
}

case "$stage" in
  build) build ;;
  test) check ;;
  bench) bench ;;
  targets) targets ;;
  all) build; check; bench; targets ;;
  *) echo "usage: bench/gpu_check.sh [build|test|bench|targets|all] [python]" >&2; exit 2 ;;
esac
