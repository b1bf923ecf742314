#!/usr/bin/env bash
# The main job: install sgfused, train and evaluate a small retrieval model on
# synthetic scenes with the fused hardest-negative loss, then run a quick benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python examples/train_tiny_retrieval.py
.venv/bin/python bench/bench_hardest_negative.py --quick
