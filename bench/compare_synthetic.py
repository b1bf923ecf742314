"""SGRAF (SGR) vs MPSM (distance), MPSM (direction) and the MPSM ensemble on the synthetic test split.

Generates a synthetic scene dataset (or reuses one), trains each model briefly with the
same recipe, and scores the test split: rSum, and the twin metrics of
:mod:`sgfused.twins` (rSum on the relation / attribute twin subsets and twin accuracy,
image->text and text->image). The ensemble averages the two MPSM similarity matrices
(the paper's MPSM*). Writes ``bench/results/mpsm_synthetic_comparison.csv``.
Usage: python bench/compare_synthetic.py [--images 1000] [--feature-dim 2048] [--epochs 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sgfused.data.precomp import PrecompSplit  # noqa: E402
from sgfused.data.synthetic import generate  # noqa: E402
from sgfused.data.vocab import Vocabulary  # noqa: E402
from sgfused.evaluate import evaluate_model, evaluate_similarity  # noqa: E402
from sgfused.models import build_model  # noqa: E402
from sgfused.models.mpsm import MPSM  # noqa: E402
from sgfused.train import TrainConfig, Trainer  # noqa: E402
from sgfused.twins import load_distractors, twin_results  # noqa: E402

SETTINGS: dict = {}  # the run's settings, repeated on every row of the table
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = {
    "SGRAF (SGR)": ("sgraf", {"module": "SGR"}),
    "MPSM (dis)": ("mpsm", {"perspective": "distance"}),
    "MPSM (dir)": ("mpsm", {"perspective": "direction"}),
}


def row(name: str, sims: torch.Tensor, records: list, captions_per_image: int, seconds: float) -> dict:
    full = evaluate_similarity(sims, captions_per_image)["full"]
    subsets, accuracy = twin_results(sims, records or [], captions_per_image)
    out = {"model": name, "rsum": f"{full['rsum']:.1f}", "train_s": f"{seconds:.0f}", **SETTINGS}
    for kind in ("relation twins", "attribute twins"):
        tag = kind.split()[0]
        out[f"{tag}_rsum"] = f"{subsets[kind]['rsum']:.1f}" if kind in subsets else ""
        out[f"{tag}_acc_i2t"] = f"{accuracy[kind]['i2t']:.1f}" if kind in accuracy else ""
        out[f"{tag}_acc_t2i"] = f"{accuracy[kind]['t2i']:.1f}" if kind in accuracy else ""
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/sgfused_compare", help="dataset folder (generated if missing)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--sim-dim", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(RESULTS, "mpsm_synthetic_comparison.csv"))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "vocab.json")):
        generate(args.data, args.images, 0, feature_dim=args.feature_dim, progress=False)
    vocab = Vocabulary.load(os.path.join(args.data, "vocab.json"))
    splits = {s: PrecompSplit(args.data, s, vocab, **{p: True for p in MPSM.data_requirements}) for s in ("train", "dev", "test")}
    test = splits["test"]
    records = load_distractors(args.data, "test")
    dims = dict(embed_size=args.embed_size, sim_dim=args.sim_dim, word_dim=64, img_dim=test.features.shape[2],
                num_regions=test.features.shape[1])
    config = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay_epochs=max(args.epochs - 1, 1),
                         batch_size=args.batch_size, device="cpu")
    SETTINGS.update(images=args.images, feature_dim=test.features.shape[2], epochs=args.epochs,
                    batch=args.batch_size, embed=args.embed_size, sim=args.sim_dim, test_images=test.n_images)
    rows, sims = [], {}
    for name, (registry, options) in MODELS.items():
        torch.manual_seed(0)
        model = build_model(registry, len(vocab), {**dims, **options})
        start = time.time()
        out_dir = os.path.join(args.data, "runs", registry + "_" + "_".join(str(v) for v in options.values()))
        Trainer(model, splits["train"], splits["dev"], vocab, config, out_dir, progress=False).fit(resume=False)
        seconds = time.time() - start
        sims[name] = evaluate_model(model, test, progress=False)[1]
        rows.append(row(name, sims[name], records, test.captions_per_image, seconds))
        print(rows[-1], flush=True)
    ensemble = (sims["MPSM (dis)"] + sims["MPSM (dir)"]) / 2
    rows.append(row("MPSM* (dis+dir average)", ensemble, records, test.captions_per_image, 0.0))
    print(rows[-1])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
