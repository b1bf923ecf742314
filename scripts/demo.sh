#!/usr/bin/env bash
# The main job: install sgfused, generate synthetic scenes, train the VSE++ baseline and
# SGRAF's two modules (SGR, SAF), evaluate each and the SGR + SAF ensemble on the test split.
# DEMO_IMAGES and DEMO_EPOCHS scale it (defaults 1000 images, 4 epochs a model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
sgfused=.venv/bin/sgfused
data=data/synthetic
runs=runs/demo
"$sgfused" info
"$sgfused" data synth --out "$data" --images "${DEMO_IMAGES:-1000}" --seed 0 --quiet
for recipe in vsepp_synthetic sgraf_synthetic_sgr sgraf_synthetic_saf; do
  echo "== $recipe"
  # a second run of this script resumes (or skips) finished training from runs/demo/<recipe>/last.pt
  "$sgfused" train --config "configs/$recipe.json" --data "$data" --out "$runs/$recipe" --epochs "${DEMO_EPOCHS:-4}" --quiet
  "$sgfused" eval "$runs/$recipe/best.pt" --data "$data" --split test --save-sims "$runs/$recipe/test_sims" --quiet
done
echo "== SGRAF ensemble (SGR + SAF), as the paper reports it"
"$sgfused" eval-ensemble "$runs/sgraf_synthetic_sgr/test_sims.npy" "$runs/sgraf_synthetic_saf/test_sims.npy"
