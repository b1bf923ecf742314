"""Benchmark search: two-stage (shortlist + fused re-rank) against exhaustive scoring on large galleries.

What it measures, per model, shortlist key and gallery size: text -> image recall@1/5/10 of
the same caption queries searched exhaustively (the model's full score against every image)
and in two stages (the ``--shortlist`` K' images with the best first-stage score, then the
full score on those; one row per K' given), the shortlist's own recall@K' (is the true image
in it), and queries per second of each, with the speed-up of two stages over exhaustive in
the same run. First stages ("keys"): the model's own pooled vectors ("own"); a VSE++
checkpoint trained on the same world ("vsepp", ``sgfused index --shortlist-checkpoint``), a
dual encoder trained for exactly this cosine; and, for SGM only, late interaction ("late",
``sgfused search --shortlist-by late``: its own object-level score ``S_o``, exact, plus its
relation level pooled; :mod:`sgfused.retrieval.late`) and its approximation over an inverted
file of node centroids ("late-ivf"). The VSE++ key trains on ``--key-train-images`` images of
the same world (default 20,000; the models on ``--train-images``): a dual encoder is cheap to train (about a minute an epoch at
20,000 here), and on the models' 1,000 images VSE++ overfits after 3-4 epochs.

How: one synthetic world (``sgfused.data.synthetic.generate``, seed 0, ``--feature-dim``-d
region features) is written once per gallery size G, with the same ``--train-images`` /
``--dev-images`` and a test split of G images; the same seed gives every dataset the same
world (classes, attributes, predicates and their feature prototypes). Each model is
trained once with ``sgfused train`` on the smallest dataset (its recipe below), the key on its
own dataset (the same seed's train and dev draws, more train images, a one-image test split
that nothing reads), and
``sgfused.retrieval.build_index`` indexes the test split of every dataset with that
checkpoint. The queries are ``--queries`` captions drawn at random (seed 0) from the
gallery's own captions and searched from their stored encodings
(:meth:`Searcher.by_indexed_caption`, exactly the query evaluation scores; SGM with its
caption graph). The true image of a caption is the one it describes; note that a 100K
synthetic gallery holds many scenes that match a short caption equally well, so absolute
recall falls with the gallery size: the comparison that matters is two-stage vs exhaustive
on the same queries.

Every step is cached in ``--work`` (datasets, runs, indexes), so a rerun only searches. Each
index is read once before it is searched, so the timings are of an index held in memory (the
page cache), not of disk reads, and each first stage's search structure (the faiss index, or
the object nodes held in memory) is built before the first timed query, as a server would at start.
Rows go to ``bench/results/search_cpu.csv`` (the CPU: the machine this was written for).
Usage: python bench/bench_search.py [--galleries 5000 100000] [--queries 300 50] [--prepare-only] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, commit, device_name  # noqa: E402

from sgfused.data.synthetic import generate  # noqa: E402
from sgfused.retrieval import Searcher, build_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# model key -> (recipe file, model option overrides, epochs): small sizes so both train in minutes on 2 cores
MODELS = {
    "sgraf": ("configs/demo_sgraf_sgr.json", {}, 5),
    "sgm": ("configs/sgm_synthetic.json", {"embed_size": 128, "word_dim": 64}, 3),
}
KEY_MODEL = ("configs/demo_vsepp.json", {}, 6)  # the trained shortlist key
KEYS = ("own", "vsepp", "late", "late-ivf")
TOPS = (1, 5, 10)


def dataset(work: Path, gallery: int, args: argparse.Namespace, train_images: int | None = None) -> Path:
    """The dataset with a test split of ``gallery`` images (generated once).

    ``train_images``: another train split size than ``--train-images`` (the key's dataset).
    """
    train_images = args.train_images if train_images is None else train_images
    folder = work / (f"data_{gallery}" if train_images == args.train_images else f"data_{gallery}_train_{train_images}")
    if not (folder / "world.json").is_file():
        counts = (train_images, args.dev_images, gallery)
        total = sum(counts)
        print(f"generating {folder} ({total} images)", flush=True)
        generate(folder, total, seed=0, feature_dim=args.feature_dim, splits=[c / total for c in counts])
    return folder


def trained(work: Path, key: str, data: Path, args: argparse.Namespace) -> Path:
    """The dev-best checkpoint of model ``key`` (or of the shortlist key, "vsepp") trained on ``data`` (resumes or skips)."""
    recipe, overrides, epochs = KEY_MODEL if key == "vsepp" else MODELS[key]
    out = work / "runs" / (key if key != "vsepp" else f"vsepp_{data.name}")
    options = {"img_dim": args.feature_dim, **overrides}
    command = [sys.executable, "-m", "sgfused", "train", "--config", str(REPO / recipe), "--data", str(data),
               "--out", str(out), "--epochs", str(1 if args.quick else epochs), "--quiet",
               "--set", *[f"{k}={json.dumps(v)}" for k, v in options.items()]]
    subprocess.run(command, check=True, cwd=work)  # outside the source tree: the installed package runs
    return out / "best.pt"


def indexed(work: Path, key: str, checkpoint: Path, data: Path, gallery: int, shortlist_key: Path | None) -> Path:
    """The index of ``data``'s test split by ``checkpoint`` (built once), keyed by ``shortlist_key``'s vectors if given."""
    folder = work / (f"index_{key}_{gallery}" if shortlist_key is None else f"index_{key}_{gallery}_{shortlist_key.parent.name}_key")
    if not (folder / "manifest.json").is_file():
        started = time.perf_counter()
        build_index(checkpoint, data, "test", folder, batch_size=256, shortlist_checkpoint=shortlist_key)
        print(f"indexed {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def warmed(index: Path) -> Path:
    """``index`` after reading its files once, so every key and K' is timed on an index held in memory.

    A 100K index is about 10 GB; without this, the first configuration searched on an index
    pays for reading its memory-mapped encodings from disk and looks several times slower.
    """
    for path in sorted(index.iterdir()):
        with open(path, "rb") as handle:
            while handle.read(1 << 26):
                pass
    return index


def search_all(searcher: Searcher, queries: list[int], shortlist: int | None) -> tuple[list[int | None], float]:
    """The 1-based rank of each query's true image within the top 10 (None when outside), and the seconds taken."""
    per_image = searcher.index.manifest["captions_per_image"]
    ranks: list[int | None] = []
    started = time.perf_counter()
    for caption in queries:
        hits = searcher.by_indexed_caption(caption, top=max(TOPS), shortlist=shortlist).hits
        found = [hit.rank for hit in hits if hit.image == caption // per_image]
        ranks.append(found[0] if found else None)
    return ranks, time.perf_counter() - started


def shortlist_recall(searcher: Searcher, queries: list[int], shortlist: int) -> float:
    """Percent of the queries whose true image is among the ``shortlist`` best first-stage scores."""
    per_image = searcher.index.manifest["captions_per_image"]
    found = 0
    for caption in queries:
        if searcher.shortlist_by != "vectors":
            rows = searcher.shortlister("image")(searcher.index.encoding("caption", [caption]), shortlist)[1]
        else:
            rows = torch.topk(searcher.index.vectors["image"] @ searcher.index.vectors["caption"][caption], shortlist).indices
        found += int(caption // per_image in rows.tolist())
    return 100.0 * found / len(queries)


def recalls(ranks: list[int | None]) -> dict[str, float]:
    return {f"r{k}": 100.0 * sum(r is not None and r <= k for r in ranks) / len(ranks) for k in TOPS}


def measured(searcher: Searcher, queries: list[int], exhaustive: tuple[list[int | None], float], shortlist: int) -> dict:
    """One row: recalls and queries/s of exhaustive search and of two stages with a shortlist of ``shortlist``."""
    two_stage = search_all(searcher, queries, shortlist)
    row = {"gallery": searcher.index.n_images, "queries": len(queries), "shortlist": shortlist,
           "shortlist_recall": round(shortlist_recall(searcher, queries, shortlist), 2),
           "stage": searcher.by_indexed_caption(queries[0], top=1, shortlist=shortlist).stage}
    for mode, (ranks, seconds) in (("exhaustive", exhaustive), ("two_stage", two_stage)):
        row |= {f"{mode}_{name}": round(value, 2) for name, value in recalls(ranks).items()}
        row[f"{mode}_qps"] = round(len(queries) / seconds, 2)
    row["speedup"] = round(row["two_stage_qps"] / row["exhaustive_qps"], 1)
    return row | {"device": device_name(torch.device("cpu")), "commit": commit()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sgfused_bench_search", help="cache folder: datasets, runs, indexes")
    parser.add_argument("--galleries", type=int, nargs="+", default=[5000, 100000], help="test-split images")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--keys", nargs="+", default=list(KEYS), choices=list(KEYS), help="shortlist keys")
    parser.add_argument("--queries", type=int, nargs="+", default=[300, 50],
                        help="caption queries per gallery, one value or one per --galleries entry (the same for both stages)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="generate, train and index, then stop: the searches can then be timed on a quiet machine")
    parser.add_argument("--shortlist", type=int, nargs="+", default=[100, 1000],
                        help="K': images the second stage re-ranks (one row each)")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--key-train-images", type=int, default=20000, help="train images of the VSE++ shortlist key")
    parser.add_argument("--dev-images", type=int, default=100)
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="galleries of 300 and 1000, 20 queries, one epoch")
    parser.add_argument("--csv", default="search_cpu.csv", help="file name of the rows in bench/results")
    args = parser.parse_args()
    if args.quick:
        args.galleries, args.queries, args.train_images, args.dev_images, args.key_train_images = [300, 1000], [20], 300, 100, 600
        args.work = args.work + "_quick"
    if len(args.queries) not in (1, len(args.galleries)):
        parser.error(f"--queries takes one value or one per gallery ({len(args.galleries)}), got {len(args.queries)}")
    queries_for = dict(zip(args.galleries, args.queries * len(args.galleries) if len(args.queries) == 1 else args.queries))
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    datasets = {gallery: dataset(work, gallery, args) for gallery in sorted(args.galleries)}
    smallest = datasets[min(datasets)]
    rows = []
    key_data = dataset(work, 1, args, train_images=args.key_train_images) if "vsepp" in args.keys else None
    key_checkpoint = trained(work, "vsepp", key_data, args) if key_data else None
    for key in args.models:
        checkpoint = trained(work, key, smallest, args)
        for gallery, data in datasets.items():
            exhaustive: tuple[list[int | None], float] | None = None  # the same for every key: searched once
            for shortlist_key in [k for k in args.keys if not k.startswith("late") or key == "sgm"]:
                index = indexed(work, key, checkpoint, data, gallery, key_checkpoint if shortlist_key == "vsepp" else None)
                if args.prepare_only:
                    continue
                searcher = Searcher(warmed(index), shortlist_by=shortlist_key if shortlist_key.startswith("late") else "vectors")
                started = time.perf_counter()
                searcher.shortlister("image")  # the first stage's structure is built once, before any timing
                print(f"{key} {gallery} {shortlist_key}: first stage built in {time.perf_counter() - started:.1f} s", flush=True)
                generator = torch.Generator().manual_seed(0)
                queries = torch.randperm(searcher.index.n_captions, generator=generator)[: queries_for[gallery]].tolist()
                exhaustive = exhaustive or search_all(searcher, queries, None)
                for shortlist in [k for k in args.shortlist if k < gallery]:  # K' >= G is exhaustive search
                    rows.append({"model": key, "key": shortlist_key} | measured(searcher, queries, exhaustive, shortlist))
                    print(json.dumps(rows[-1]), flush=True)
    if args.prepare_only:
        print(f"prepared {work}: datasets, checkpoints and indexes; run again without --prepare-only to search")
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "search_cpu_quick.csv" if args.quick else args.csv)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"rows -> {path}")
    print("| model | key | gallery | R@1 / 5 / 10 exhaustive | R@1 / 5 / 10 two-stage | shortlist recall@K' | queries/s exh. | two-stage | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['key']} | {r['gallery']} | {r['exhaustive_r1']} / {r['exhaustive_r5']} / {r['exhaustive_r10']} | "
              f"{r['two_stage_r1']} / {r['two_stage_r5']} / {r['two_stage_r10']} | {r['shortlist_recall']} | "
              f"{r['exhaustive_qps']} | {r['two_stage_qps']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
