#!/usr/bin/env bash
# Compiles every Triton kernel that the op tests (python_tests/test_<op>[_*].py for each op in
# sgfused.ops.OPS) launch for a Hopper GPU (sm_90) with Triton's own GPU pipeline (ptxas
# included), with no GPU: each launch is compiled, then run in the
# interpreter so the tests still check values (scripts/triton_compile_only.py). Catches kernels
# the interpreter accepts but the GPU compiler rejects.
#
#   scripts/check_triton_compile.sh [PYTHON] [TRITON_VERSION]
#
# PYTHON (default .venv/bin/python) must have sgfused installed. TRITON_VERSION, if given, is
# installed into a throwaway folder that shadows the environment's triton for this check only
# (3.6.0 is the Triton of torch 2.11, the oldest we support, and of the GPU machines); then, if
# bench/results/triton_sm90_resources_triton<VERSION>.csv exists, checks that no kernel spills more
# under that Triton than it says (bench/triton_sm90_resources.py --check --report).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-.venv/bin/python}"
overlay=""
if [[ -n "${2:-}" ]]; then
  overlay="$(mktemp -d "${TMPDIR:-/tmp}/sgfused-triton.XXXXXX")"
  trap 'rm -rf "$overlay"' EXIT
  # numpy < 2.3: Triton 3.6's interpreter converts 1-element arrays to Python scalars
  "$python" -m pip install -q --no-deps --target "$overlay" "triton==$2" "numpy<2.3"
fi
echo "check_triton_compile: triton $(PYTHONPATH="$overlay" "$python" -c 'import triton; print(triton.__version__)'), sm_${SGFUSED_COMPILE_ARCH:-90}"
# -P keeps the checkout off sys.path: the tests import the installed package, as in scripts/test.sh
# the op test files: python_tests/test_<name>.py and test_<name>_*.py for every op in sgfused.ops.OPS
# (the one op list)
read -r -a tests <<< "$("$python" -P -c 'import glob; from sgfused.ops import OPS
print(*sorted(f for name in OPS for f in [f"python_tests/test_{name}.py", *glob.glob(f"python_tests/test_{name}_*.py")]))')"
# gradcheck and opcheck relaunch kernels that the value tests already compile, hundreds of times
# each in the interpreter (with them, this check had run 15 min on 2 cores and was a third
# done, inside cross_attention's gradcheck): left out here, they run in the main suite. Cost: the fp64 cross_attention specialisations (only gradcheck uses
# them) are not compiled for sm_90 here.
PYTHONPATH="${overlay:+$overlay:}$PWD/scripts" "$python" -P -m pytest -q -p triton_compile_only -W ignore \
  "${tests[@]}" -k "triton and not gradcheck and not opcheck"
# that Triton's register report, where one is committed: no kernel may spill more than it says
report="bench/results/triton_sm90_resources_triton${2:-}.csv"
if [[ -n "${2:-}" && -f "$report" ]]; then
  PYTHONPATH="$overlay" "$python" -P bench/triton_sm90_resources.py --check --report "$report"
fi
echo "check_triton_compile: OK"
