#!/usr/bin/env bash
# The main job: install sgfused, generate synthetic scenes, train the VSE++ baseline and
# SGRAF's two modules (SGR, SAF) with the demo recipes (configs/demo_*.json: small enough
# for a 2-core CPU, summed hinges first so no model collapses), evaluate each and the
# SGR + SAF ensemble on the test split, and end with one summary table.
# DEMO_IMAGES scales the data (default 1000 images); DEMO_EPOCHS, when set, replaces every
# recipe's epoch count. A second run keeps the dataset and resumes (or skips) finished training;
# with another DEMO_IMAGES, `sgfused data synth` refuses the existing folder: delete data/synthetic and runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
sgfused=.venv/bin/sgfused
data=data/synthetic
runs=runs/demo
"$sgfused" info
"$sgfused" data synth --out "$data" --images "${DEMO_IMAGES:-1000}" --seed 0 --quiet
for recipe in demo_vsepp demo_sgraf_sgr demo_sgraf_saf; do
  echo "== $recipe (configs/$recipe.json)"
  # progress: a bar per epoch and one line per epoch (dev rSum, time); says when it resumes or skips
  "$sgfused" train --config "configs/$recipe.json" --data "$data" --out "$runs/$recipe" ${DEMO_EPOCHS:+--epochs "$DEMO_EPOCHS"}
  "$sgfused" eval "$runs/$recipe/best.pt" --data "$data" --split test --quiet \
    --save-sims "$runs/$recipe/test_sims" --json "$runs/$recipe/test.json"
done
echo "== SGRAF ensemble (SGR + SAF), as the paper reports it"
"$sgfused" eval-ensemble "$runs/demo_sgraf_sgr/test_sims.npy" "$runs/demo_sgraf_saf/test_sims.npy" \
  --json "$runs/sgraf_ensemble.json"
echo "== summary: test split; twin accuracy = true match preferred over its hard-distractor twin (chance 50)"
.venv/bin/python scripts/demo_summary.py \
  --row "VSE++" "$runs/demo_vsepp/test.json" "$runs/demo_vsepp/log.csv" \
  --row "SGRAF (SGR)" "$runs/demo_sgraf_sgr/test.json" "$runs/demo_sgraf_sgr/log.csv" \
  --row "SGRAF (SAF)" "$runs/demo_sgraf_saf/test.json" "$runs/demo_sgraf_saf/log.csv" \
  --row "SGRAF (SGR + SAF)" "$runs/sgraf_ensemble.json"
