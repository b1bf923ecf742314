"""SGRAF recall with bf16 matrix inputs against fp32, on trained models: the accuracy side of the bf16 speedup.

Scores a split with each trained SGRAF checkpoint twice, ``model.similarity`` in fp32 and with
``dtype=torch.bfloat16`` (what ``sgfused eval --similarity-dtype bf16`` runs), and reports
R@1 in both directions, rSum and the largest score difference. The checkpoints are those
``bench/compare_synthetic.py`` trains (``DATA/runs/sgr`` and ``DATA/runs/saf``) or any given.
Writes ``bench/results/sgraf_bf16_recall_cpu.csv``.
Usage: python bench/sgraf_bf16_recall.py --data DATA [--runs DATA/runs/sgr/best.pt ...] [--split test]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from sgfused.checkpoint import load_checkpoint, model_from_checkpoint
from sgfused.data.precomp import PrecompSplit
from sgfused.evaluate import evaluate_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METRICS = ("i2t_r1", "t2i_r1", "rsum")


def compare(checkpoint: str, data: str, split: str) -> dict:
    model, vocab = model_from_checkpoint(load_checkpoint(checkpoint))
    dataset = PrecompSplit(data, split, vocab)
    results, sims = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        table, sims[name] = evaluate_model(model, dataset, progress=False, similarity_dtype=dtype)
        results[name] = table["full"]
    row = {"checkpoint": checkpoint, "module": model.sim_encoder.module_name, "split": split,
           "images": dataset.n_images, "captions": dataset.n_captions}
    for key in METRICS:
        row[f"{key}_fp32"], row[f"{key}_bf16"] = f"{results['fp32'][key]:.1f}", f"{results['bf16'][key]:.1f}"
    row["max_score_diff"] = f"{(sims['bf16'] - sims['fp32']).abs().max().item():.2e}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="synthetic (or precomp) dataset folder")
    parser.add_argument("--runs", nargs="*",
                        help="checkpoints (default DATA/runs/sgr/best.pt and DATA/runs/saf/best.pt)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    runs = args.runs or [os.path.join(args.data, "runs", key, "best.pt") for key in ("sgr", "saf")]
    rows = [compare(run, args.data, args.split) for run in runs]
    path = os.path.join(RESULTS, "sgraf_bf16_recall_cpu.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
