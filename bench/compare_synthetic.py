"""Every model on the synthetic test split, with the hard-distractor (twin) subsets reported apart.

Generates a synthetic scene dataset (or reuses one), trains each model with one shared
recipe (epochs, batch, lr, summed-hinge warm-up, then max violation) and scores the test
split: rSum, and the twin metrics of :mod:`sgfused.twins` (rSum on the relation / attribute
twin subsets and twin accuracy, image->text and text->image). The ensembles average
similarity matrices as the papers report them: SGRAF = SGR + SAF, MPSM* = distance +
direction. VSE++ is the bag-of-words baseline. Model sizes are small (``--embed-size``,
``--sim-dim``) so the whole table trains on a 2-core CPU.
Runs are kept in ``DATA/runs/<model>``; a finished run is scored again, not retrained
(delete the folder to retrain). Writes ``bench/results/synthetic_comparison.csv``.
Usage: python bench/compare_synthetic.py [--images 1000] [--epochs 6] [--models sgr,saf,...]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sgfused.checkpoint import load_checkpoint  # noqa: E402
from sgfused.data.precomp import PrecompSplit  # noqa: E402
from sgfused.data.synthetic import generate  # noqa: E402
from sgfused.data.vocab import Vocabulary  # noqa: E402
from sgfused.evaluate import evaluate_model, evaluate_similarity  # noqa: E402
from sgfused.models import build_model, model_class  # noqa: E402
from sgfused.train import TrainConfig, Trainer  # noqa: E402
from sgfused.twins import load_distractors, twin_results  # noqa: E402

SETTINGS: dict = {}  # the run's settings, repeated on every row of the table
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# key: (table name, registry name, model options beyond the shared sizes, training options beyond the shared recipe)
MODELS = {
    "vsepp": ("VSE++", "vsepp", {}, {}),
    "sgr": ("SGRAF (SGR)", "sgraf", {"module": "SGR"}, {}),
    "saf": ("SGRAF (SAF)", "sgraf", {"module": "SAF"}, {}),
    "mpsm_dis": ("MPSM (dis)", "mpsm", {"perspective": "distance"}, {}),
    "mpsm_dir": ("MPSM (dir)", "mpsm", {"perspective": "direction"}, {}),
    # SGFN fuses every pair (a cross-encoder): at the shared sizes one epoch takes hours on 2 cores,
    # so it trains with configs/sgfn_synthetic.json's sizes and batch (max violation collapsed it here too)
    "sgfn": ("SGFN", "sgfn", {"embed_size": 64, "word_dim": 32, "heads": 2}, {"batch_size": 32}),
    "cmsei": ("CMSEI (i2t)", "cmsei", {"direction": "i2t"}, {}),  # num_regions: its default 36 = the generator's
    "sgm": ("SGM", "sgm", {}, {}),  # reads the generator's {split}_ims_rels.npy relation features
}
SIZES = ("embed_size", "word_dim", "sim_dim", "heads")
ENSEMBLES = {"SGRAF (SGR+SAF average)": ("sgr", "saf"), "MPSM* (dis+dir average)": ("mpsm_dis", "mpsm_dir")}


def row(name: str, sims: torch.Tensor, records: list, captions_per_image: int, seconds: float, recipe: str) -> dict:
    full = evaluate_similarity(sims, captions_per_image)["full"]
    subsets, accuracy = twin_results(sims, records or [], captions_per_image)
    out = {"model": name, "rsum": f"{full['rsum']:.1f}", "i2t_r1": f"{full['i2t_r1']:.1f}",
           "t2i_r1": f"{full['t2i_r1']:.1f}", "train_s": f"{seconds:.0f}", "recipe": recipe}
    for kind in ("relation twins", "attribute twins"):
        tag = kind.split()[0]
        out[f"{tag}_rsum"] = f"{subsets[kind]['rsum']:.1f}" if kind in subsets else ""
        out[f"{tag}_acc_i2t"] = f"{accuracy[kind]['i2t']:.1f}" if kind in accuracy else ""
        out[f"{tag}_acc_t2i"] = f"{accuracy[kind]['t2i']:.1f}" if kind in accuracy else ""
    return out | SETTINGS


def training_seconds(out_dir: str) -> float:
    """The run's training time from its log (a finished run found again is not retrained)."""
    with open(os.path.join(out_dir, "log.csv"), newline="") as handle:
        return float(list(csv.DictReader(handle))[-1]["seconds"])


def sizes(registry: str, args: argparse.Namespace, features: torch.Tensor) -> dict:
    """The shared model sizes, in the option names of each model."""
    common = dict(embed_size=args.embed_size, word_dim=64, img_dim=features.shape[2])
    if registry in ("sgraf", "mpsm"):
        return common | dict(sim_dim=args.sim_dim, num_regions=features.shape[1])
    return common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/sgfused_compare", help="dataset folder (generated if missing)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sum-warmup-epochs", type=int, default=6, help="summed-hinge epochs before max violation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--embed-size", type=int, default=256)
    parser.add_argument("--sim-dim", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--out", default=os.path.join(RESULTS, "synthetic_comparison.csv"))
    args = parser.parse_args()
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if not os.path.exists(os.path.join(args.data, "vocab.json")):
        generate(args.data, args.images, 0, feature_dim=args.feature_dim, progress=False)
    vocab = Vocabulary.load(os.path.join(args.data, "vocab.json"))
    parts = {part: True for key in chosen for part in model_class(MODELS[key][1]).data_requirements}
    splits = {s: PrecompSplit(args.data, s, vocab, **parts) for s in ("train", "dev", "test")}
    test = splits["test"]
    records = load_distractors(args.data, "test")
    config = TrainConfig(epochs=args.epochs, lr=args.lr, lr_decay_epochs=args.epochs, batch_size=args.batch_size,
                         sum_warmup_epochs=args.sum_warmup_epochs, device="cpu")
    SETTINGS.update(images=splits["train"].n_images + splits["dev"].n_images + test.n_images,
                    feature_dim=test.features.shape[2], epochs=args.epochs, sum_warmup=args.sum_warmup_epochs,
                    batch=args.batch_size, lr=args.lr, embed=args.embed_size, sim=args.sim_dim,
                    test_images=test.n_images)
    rows, sims = [], {}
    for key in chosen:
        name, registry, options, training = MODELS[key]
        torch.manual_seed(0)
        model = build_model(registry, len(vocab), sizes(registry, args, test.features) | options)
        out_dir = os.path.join(args.data, "runs", key)
        recipe = dataclasses.replace(config, **training)
        Trainer(model, splits["train"], splits["dev"], vocab, recipe, out_dir, progress=False).fit()
        model.load_state_dict(load_checkpoint(os.path.join(out_dir, "best.pt"))["model"])  # chosen on dev rSum
        sims[key] = evaluate_model(model, test, progress=False)[1]
        overrides = {k: v for k, v in options.items() if k in SIZES} | training
        note = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "shared"
        rows.append(row(name, sims[key], records, test.captions_per_image, training_seconds(out_dir), note))
        print(rows[-1], flush=True)
    for name, members in ENSEMBLES.items():
        if all(member in sims for member in members):
            mean = sum(sims[member] for member in members) / len(members)
            rows.append(row(name, mean, records, test.captions_per_image, 0.0, "average of the two"))
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
