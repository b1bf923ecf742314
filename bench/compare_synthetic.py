"""Every model on the hard synthetic setting, trained to a dev plateau, with twin accuracies and ablations.

Data: ``sgfused data synth --setting hard`` (relations only in boxes and visual graphs; a
twin shares its base image's region features, so a bag-of-regions model is at 50% on
relation twins by construction, see :mod:`sgfused.data.synthetic`), 2000 train / 200 dev /
800 test images with half of each split twins, so the test split holds >= 200 relation and
>= 100 attribute twin pairs (checked; the run stops otherwise).

Training (one recipe for all; per-model sizes as in ``MODELS``): Adam at a constant
learning rate, summed hinges throughout (SGRAF-style heads collapse under max violation
from a random start, README "Training"), dev rSum after every epoch. Patience rule: a
model stops when ``--patience`` consecutive epochs have not raised the best dev rSum by
more than ``--min-delta`` points, or after ``--max-epochs``, or when its training time
passes ``--budget-minutes`` (checked after each epoch; such a row is marked "budget" and,
unlike the others, depends on the machine's speed). The dev-best checkpoint is scored.
Same seed, same thread count (``--threads``) and a stop that is not "budget": same row.

Resumable: everything lives in ``DATA/runs/<model>`` (``last.pt``, ``best.pt``, ``log.csv``,
``progress.json``, cached test similarities); run the same command again after a kill and
each model continues from its last finished epoch; finished models are only re-scored. The
stop is decided afresh on every run, so a model stopped by its budget continues when the
command is run again with a larger ``--budget-minutes`` (and a run with ``--budget-minutes 0``
only re-scores); training an epoch drops the cached test similarities, and each row reports
the budget its model last trained under.

Ablations (test time, on the trained dev-best weights): MPSM with ``spatial_prior`` /
``dependency_prior`` off; SGFN, SGM and CMSEI with the visual graphs' relations removed;
CMSEI with zero boxes (IoU 0 everywhere: no spatial graph edges).

Variants (``VARIANTS``, trained only when named in ``--models``): ``mpsm_dis_printed`` and
``mpsm_dir_printed`` are MPSM with Eq. 5 as printed (``kgid_logit_scale=1``), where the
models' default multiplies its logits by the paper's lambda; run them with their own
``--results`` folder next to ``mpsm_dis`` / ``mpsm_dir`` to compare the two readings.

Writes ``RESULTS/synthetic_comparison.csv`` (rSum, R@1 both ways, twin accuracies with
95% Wilson intervals over the twin comparisons), ``RESULTS/synthetic_curves.csv`` and ``.png``
(dev rSum against optimizer steps, every model) and ``RESULTS/synthetic_twin_accuracy.png``.
A run of some models (``--models``) keeps the rows and curves of the others from the earlier
table when it was made with the same settings (rows of other settings are dropped, and the
run says so); an ensemble row is recomputed when one of its members was run.
``--quick`` is a smoke run at tiny sizes (minutes; its figures mean nothing).
Usage: python bench/compare_synthetic.py [--models vsepp,sgr,...] [--budget-minutes 90] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from typing import Any, Callable

import torch

from sgfused.checkpoint import load_checkpoint, model_from_checkpoint
from sgfused.data.precomp import PrecompSplit
from sgfused.data.synthetic import WorldConfig, generate
from sgfused.data.vocab import Vocabulary
from sgfused.evaluate import evaluate_model, evaluate_similarity
from sgfused.models import build_model, model_class
from sgfused.train import TrainConfig, Trainer
from sgfused.twins import load_distractors, twin_results

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SPLIT_IMAGES = (2000, 200, 800)  # train, dev, test: the test split sets the twin counts, the others the cost
# key: (table name, registry name, model options beyond the shared sizes, training options beyond the recipe)
MODELS = {
    "vsepp": ("VSE++", "vsepp", {}, {}),
    "sgr": ("SGRAF (SGR)", "sgraf", {"module": "SGR"}, {}),
    "saf": ("SGRAF (SAF)", "sgraf", {"module": "SAF"}, {}),
    "mpsm_dis": ("MPSM (dis)", "mpsm", {"perspective": "distance"}, {}),
    "mpsm_dir": ("MPSM (dir)", "mpsm", {"perspective": "direction"}, {}),
    # a cross-encoder over every pair: configs/sgfn_synthetic.json's sizes and batch keep it affordable on CPUs
    "sgfn": ("SGFN", "sgfn", {"embed_size": 64, "word_dim": 32, "heads": 2}, {"batch_size": 32}),
    "sgm": ("SGM", "sgm", {}, {}),
    # also an interaction per pair: 33 s per step at the shared sizes (86 min an epoch on 2 cores), so smaller
    "cmsei": ("CMSEI (i2t)", "cmsei", {"direction": "i2t", "embed_size": 128}, {"batch_size": 32}),
    # variants, not a paper's models (run only when named in --models): Eq. 5's logits as printed, not x lambda
    "mpsm_dis_printed": ("MPSM (dis), Eq. 5 as printed", "mpsm", {"perspective": "distance", "kgid_logit_scale": 1.0}, {}),
    "mpsm_dir_printed": ("MPSM (dir), Eq. 5 as printed", "mpsm", {"perspective": "direction", "kgid_logit_scale": 1.0}, {}),
}
VARIANTS = ("mpsm_dis_printed", "mpsm_dir_printed")
DEFAULT_MODELS = tuple(key for key in MODELS if key not in VARIANTS)  # what a run without --models trains
ENSEMBLES = {"SGRAF (SGR+SAF average)": ("sgr", "saf"), "MPSM* (dis+dir average)": ("mpsm_dis", "mpsm_dir")}


class AblatedSplit:
    """A split whose images are changed by ``change(item) -> item`` (for test-time ablations); the rest delegated."""

    def __init__(self, split: PrecompSplit, change: Callable[[Any], Any]) -> None:
        self._split, self._change = split, change

    def __getattr__(self, name: str) -> Any:
        return getattr(self._split, name)

    def image(self, i: int) -> Any:
        return self._change(self._split.image(i))


def _without_relations(item: Any) -> Any:
    return item._replace(graph={**item.graph, "rels": []})


def _zero_boxes(item: Any) -> Any:
    return item._replace(boxes=torch.zeros_like(item.boxes))


def _set(name: str, value: Any) -> Callable[[torch.nn.Module], None]:
    return lambda model: setattr(model, name, value)


# key -> [(row suffix, model change or None, image change or None)]
ABLATIONS: dict[str, list[tuple[str, Any, Any]]] = {
    **{key: [("spatial prior off", _set("spatial_prior", False), None),
             ("dependency prior off", _set("dependency_prior", False), None)]
       for key in ("mpsm_dis", "mpsm_dir", *VARIANTS)},
    "sgfn": [("no graph relations", None, _without_relations)],
    "sgm": [("no graph relations", None, _without_relations)],
    "cmsei": [("no graph relations", None, _without_relations), ("zero boxes (no spatial graph)", None, _zero_boxes)],
}


def sizes(registry: str, args: argparse.Namespace, features: torch.Tensor) -> dict:
    """The shared model sizes, in the option names of each model."""
    common = dict(embed_size=args.embed_size, word_dim=64, img_dim=features.shape[2])
    if registry in ("sgraf", "mpsm", "cmsei"):
        common["num_regions"] = features.shape[1]
    if registry in ("sgraf", "mpsm"):
        common["sim_dim"] = args.sim_dim
    return common


def dev_history(out_dir: str) -> list[tuple[int, float]]:
    """(optimizer step, dev rSum) of every validation in the run's log."""
    path = os.path.join(out_dir, "log.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return [(int(r["step"]), float(r["rsum"])) for r in csv.DictReader(handle) if r["rsum"]]


def stop_reason(history: list[tuple[int, float]], seconds: float, args: argparse.Namespace) -> str | None:
    """Why training stops now (the patience rule of the module docstring), or None to train on."""
    best, since = float("-inf"), 0
    for _, rsum in history:
        best, since = (rsum, 0) if rsum > best + args.min_delta else (best, since + 1)
    if history and since >= args.patience:
        return "plateau"
    if len(history) >= args.max_epochs:
        return "max epochs"
    if seconds >= 60 * args.budget_minutes:
        return "budget"
    return None


def train_to_plateau(key: str, args: argparse.Namespace, splits: dict, vocab: Vocabulary, config: TrainConfig) -> dict:
    """Train (or continue) one model epoch by epoch until :func:`stop_reason`; its progress record."""
    name, registry, options, _ = MODELS[key]
    out_dir = os.path.join(args.data, "runs", key)
    progress_path = os.path.join(out_dir, "progress.json")
    progress = json.load(open(progress_path)) if os.path.exists(progress_path) else {"seconds": 0.0}
    progress["stopped"] = None  # decided afresh: a larger budget continues a budget-stopped model
    while progress["stopped"] is None:
        history = dev_history(out_dir)
        progress["stopped"] = stop_reason(history, progress["seconds"], args)
        if progress["stopped"] is not None:
            break
        drop_cached_similarities(out_dir)
        progress["budget_minutes"] = args.budget_minutes
        torch.manual_seed(args.seed)
        model = build_model(registry, len(vocab), sizes(registry, args, splits["test"].features) | options)
        started = time.time()
        epoch_config = TrainConfig(**{**config.__dict__, "epochs": len(history) + 1})
        Trainer(model, splits["train"], splits["dev"], vocab, epoch_config, out_dir, progress=False, verbose=False).fit()
        progress["seconds"] += time.time() - started
        os.makedirs(out_dir, exist_ok=True)
        with open(progress_path, "w") as handle:
            json.dump(progress, handle)
        print(f"{name}: epoch {len(history) + 1}, dev rSum {dev_history(out_dir)[-1][1]:.1f}, "
              f"{progress['seconds'] / 60:.1f} min", flush=True)
    with open(progress_path, "w") as handle:
        json.dump(progress, handle)
    return progress | {"out_dir": out_dir, "history": dev_history(out_dir)}


def drop_cached_similarities(out_dir: str) -> None:
    """Remove the cached test similarities of a run whose dev-best checkpoint may be about to change."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.startswith("test_sims") and name.endswith(".pt"):
                os.remove(os.path.join(out_dir, name))


def test_similarities(key: str, suffix: str, out_dir: str, test: PrecompSplit, model_change: Any, image_change: Any) -> torch.Tensor:
    """The dev-best model's test similarities (cached in the run folder), with an ablation applied if given."""
    cache = os.path.join(out_dir, f"test_sims{'_' + suffix.replace(' ', '_') if suffix else ''}.pt")
    if os.path.exists(cache):
        return torch.load(cache)
    model, vocab = model_from_checkpoint(load_checkpoint(os.path.join(out_dir, "best.pt")), out_dir)
    model.set_vocabulary(vocab)  # SGM and SGFN embed the visual graphs' labels through it
    if model_change is not None:
        model_change(model)
    split = AblatedSplit(test, image_change) if image_change is not None else test
    sims = evaluate_model(model, split, progress=False)[1]
    torch.save(sims, cache)
    return sims


def row(name: str, sims: torch.Tensor, records: list, captions_per_image: int, progress: dict | None) -> dict:
    """One table row: recalls, twin accuracies with 95% Wilson intervals, how training ended."""
    full = evaluate_similarity(sims, captions_per_image)["full"]
    _, accuracy = twin_results(sims, records, captions_per_image)
    out = {"model": name, "rsum": f"{full['rsum']:.1f}", "i2t_r1": f"{full['i2t_r1']:.1f}", "t2i_r1": f"{full['t2i_r1']:.1f}"}
    for kind in ("relation twins", "attribute twins"):
        tag, a = kind.split()[0], accuracy.get(kind)
        out[f"{tag}_pairs"] = a["pairs"] if a else 0
        for way in ("i2t", "t2i"):
            low, high = a[f"{way}_ci95"] if a else (float("nan"),) * 2
            out[f"{tag}_{way}"], out[f"{tag}_{way}_low"], out[f"{tag}_{way}_high"] = (
                f"{a[way]:.1f}" if a else "", f"{low:.1f}", f"{high:.1f}")
        out[f"{tag}_response"] = f"{a['response']:.3f}" if a else ""
    history = (progress or {}).get("history", [])
    out |= {"stopped": (progress or {}).get("stopped") or "", "epochs": len(history),
            "steps": history[-1][0] if history else "", "train_min": f"{progress['seconds'] / 60:.1f}" if progress else "",
            "budget_min": (progress or {}).get("budget_minutes", "")}
    return out


def owner(model: str) -> str | None:
    """The ``MODELS`` key a table row belongs to (the model's row or one of its ablations); None for an ensemble.

    The longest matching name decides, so a variant's rows ("MPSM (dis), Eq. 5 as printed, ...") are not
    taken for an ablation of the model whose name they start with."""
    matches = [(len(name), key) for key, (name, *_) in MODELS.items() if model == name or model.startswith(name + ", ")]
    return max(matches)[1] if matches else None


def earlier(path: str, settings: dict, redone: Callable[[dict], bool]) -> list[dict]:
    """The rows of an earlier CSV made with the same settings that this run did not redo."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        old = list(csv.DictReader(handle))
    same = [r for r in old if all(r.get(k) == str(v) for k, v in settings.items())]
    if len(same) < len(old):
        print(f"{path}: {len(old) - len(same)} rows of other settings dropped", flush=True)
    return [r for r in same if not redone(r)]


def merged_table(rows: list[dict], path: str, settings: dict, fresh: set[str]) -> list[dict]:
    """This run's rows with the earlier table's rows of the models not run now, in ``MODELS`` order."""

    def redone(r: dict) -> bool:
        key = owner(r["model"])
        return key in fresh if key is not None else any(m in fresh for m in ENSEMBLES.get(r["model"], ()))

    def order(r: dict) -> int:
        key = owner(r["model"])
        return list(MODELS).index(key) if key is not None else len(MODELS) + list(ENSEMBLES).index(r["model"])

    settings = {k: str(v) for k, v in settings.items()}
    return sorted([r | settings for r in rows] + earlier(path, settings, redone), key=order)


def merged_curves(histories: dict[str, list], path: str, settings: dict) -> dict[str, list[tuple[int, float]]]:
    """This run's dev histories with the earlier curves CSV's histories of the models not run now."""
    kept = earlier(path, settings, lambda r: r["model"] in histories)
    merged = {key: list(history) for key, history in histories.items()}
    for r in kept:
        merged.setdefault(r["model"], []).append((int(r["step"]), float(r["dev_rsum"])))
    return {key: merged[key] for key in MODELS if key in merged}


def write_curves(histories: dict[str, list], path: str, settings: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "step", "dev_rsum", *settings])
        writer.writeheader()
        writer.writerows({"model": key, "step": step, "dev_rsum": rsum} | settings
                         for key, history in histories.items() for step, rsum in history)


def plot(rows: list[dict], histories: dict[str, list], results: str) -> None:
    """The learning curves and the twin-accuracy bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for key, history in histories.items():
        steps, rsums = zip(*history) if history else ((), ())
        axis.plot(steps, rsums, marker=".", label=MODELS[key][0])
    axis.set(xlabel="optimizer steps", ylabel="dev rSum", title="Hard synthetic setting: dev rSum while training")
    axis.legend()
    figure.savefig(os.path.join(results, "synthetic_curves.png"), dpi=120, bbox_inches="tight")
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 2), sharey=True)
    for axis, tag in zip(axes, ("relation", "attribute")):
        for offset, way in ((-0.2, "t2i"), (0.2, "i2t")):
            values = [float(r[f"{tag}_{way}"] or "nan") for r in rows]
            errors = [[v - float(r[f"{tag}_{way}_low"]) for v, r in zip(values, rows)],
                      [float(r[f"{tag}_{way}_high"]) - v for v, r in zip(values, rows)]]
            axis.barh([i + offset for i in range(len(rows))], values, height=0.4, xerr=errors, label=way)
        axis.axvline(50, color="gray", linestyle="--")
        axis.set(xlabel=f"{tag} twin accuracy, % (95% Wilson)", xlim=(0, 100))
        axis.legend()
    axes[0].set_yticks(range(len(rows)), [r["model"] for r in rows])
    axes[0].invert_yaxis()
    figure.savefig(os.path.join(results, "synthetic_twin_accuracy.png"), dpi=120, bbox_inches="tight")


def dataset(args: argparse.Namespace) -> None:
    """Generate the hard dataset unless the folder has one; refuse too few twin pairs (full runs)."""
    counts = (300, 100, 100) if args.quick else SPLIT_IMAGES
    if not os.path.exists(os.path.join(args.data, "vocab.json")):
        world = WorldConfig(setting="hard", distractor_fraction=args.twin_fraction)
        generate(args.data, sum(counts), args.seed, feature_dim=args.feature_dim, splits=[c / sum(counts) for c in counts],
                 world=world, progress=False)
    records = load_distractors(args.data, "test") or []
    relation = sum(r["differs"] != "attribute" for r in records)
    attribute = len(records) - relation
    if not args.quick and (relation < 200 or attribute < 100):
        raise SystemExit(f"{args.data}: the test split holds {relation} relation and {attribute} attribute twin pairs; "
                         "the benchmark needs >= 200 and >= 100 (a larger --twin-fraction, or delete the folder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/sgfused_compare_hard", help="dataset folder (generated if missing)")
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--twin-fraction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--embed-size", type=int, default=256)
    parser.add_argument("--sim-dim", type=int, default=64)
    parser.add_argument("--patience", type=int, default=3, help="epochs without a dev rSum gain > --min-delta")
    parser.add_argument("--min-delta", type=float, default=1.0)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--budget-minutes", type=float, default=90.0, help="training time per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the numerics depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {list(MODELS)} (default: all but the variants {list(VARIANTS)})")
    parser.add_argument("--results", default=RESULTS, help="folder of the table and the figures")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 images, 32-d features, tiny models, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.feature_dim, args.embed_size, args.sim_dim, args.max_epochs, args.patience = 32, 32, 16, 2, 1
        args.data = args.data.rstrip("/") + "_quick"
        args.results = os.path.join(args.data, "results")
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    dataset(args)
    vocab = Vocabulary.load(os.path.join(args.data, "vocab.json"))
    parts = {part: True for key in chosen for part in model_class(MODELS[key][1]).data_requirements}
    splits = {s: PrecompSplit(args.data, s, vocab, **parts) for s in ("train", "dev", "test")}
    test, records = splits["test"], load_distractors(args.data, "test") or []
    config = TrainConfig(lr=args.lr, lr_decay_epochs=10**6, batch_size=args.batch_size, max_violation=False,
                         seed=args.seed, device="cpu")
    rows, sims, runs = [], {}, {}
    for key in chosen:
        training = MODELS[key][3]
        recipe = TrainConfig(**{**config.__dict__, **training})
        runs[key] = train_to_plateau(key, args, splits, vocab, recipe)
        sims[key] = test_similarities(key, "", runs[key]["out_dir"], test, None, None)
        rows.append(row(MODELS[key][0], sims[key], records, test.captions_per_image, runs[key]))
        print(rows[-1], flush=True)
        for suffix, model_change, image_change in ABLATIONS.get(key, []):
            ablated = test_similarities(key, suffix, runs[key]["out_dir"], test, model_change, image_change)
            rows.append(row(f"{MODELS[key][0]}, {suffix}", ablated, records, test.captions_per_image, None))
            print(rows[-1], flush=True)
    for name, members in ENSEMBLES.items():
        if any(member in sims for member in members):  # else the earlier table's row stands
            for member in members:  # a member not run now: its finished run's cached similarities
                if member not in sims and os.path.exists(os.path.join(args.data, "runs", member, "best.pt")):
                    sims[member] = test_similarities(member, "", os.path.join(args.data, "runs", member), test, None, None)
            if all(member in sims for member in members):
                mean = sum(sims[member] for member in members) / len(members)
                rows.append(row(name, mean, records, test.captions_per_image, None))
    os.makedirs(args.results, exist_ok=True)
    settings = {"setting": "hard", "images": "/".join(map(str, (splits[s].n_images for s in ("train", "dev", "test")))),
                "feature_dim": args.feature_dim, "lr": args.lr, "batch": args.batch_size, "embed": args.embed_size,
                "sim": args.sim_dim, "patience": args.patience, "min_delta": args.min_delta,
                "threads": args.threads, "seed": args.seed}
    table_path = os.path.join(args.results, "synthetic_comparison.csv")
    table = merged_table(rows, table_path, settings, set(chosen))
    with open(table_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + list(settings))
        writer.writeheader()
        writer.writerows(table)
    curves_path = os.path.join(args.results, "synthetic_curves.csv")
    histories = merged_curves({key: runs[key]["history"] for key in chosen}, curves_path, settings)
    write_curves(histories, curves_path, settings)
    plot(table, histories, args.results)
    print("wrote", args.results)


if __name__ == "__main__":
    main()
