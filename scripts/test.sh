#!/usr/bin/env bash
# Installs sgfused (scripts/install.sh) and runs the whole test suite.
# Without a GPU the Triton kernels run in interpreter mode and CUDA tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The pytest entry point (not `python -m pytest`) keeps the source tree off sys.path,
# so the tests import the installed package with its compiled kernels.
.venv/bin/pytest python_tests -q "$@"
