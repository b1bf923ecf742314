#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch and installs sgfused into it.
# torch goes in first and the package builds without isolation: an isolated build
# would fetch another torch and the compiled kernels would not match it.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==${SGFUSED_TORCH:-2.13.0}"
.venv/bin/pip install -q -r requirements-dev.txt
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/pip install -q --no-build-isolation .
# from another directory: in the checkout, the uncompiled sources would shadow the installed package
(cd / && "$OLDPWD/.venv/bin/python" -c "import sgfused; print('sgfused', sgfused.__version__, sgfused.build_info())")
