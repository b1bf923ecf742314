"""Which relation twins can each model tell apart at all? What its image inputs carry of the change.

What: for every relation twin pair of a synthetic split (``{split}_distractors.json``), whether
the inputs each model reads on the image side differ between the two images in the changed
relation, and so the highest relation-twin accuracy the model can reach in expectation:
``50 + 50 * carried / pairs`` (a pair whose inputs do not carry the change is a coin flip,
ties counting half). Inputs, as the models read them (their module docstrings):

- region features (VSE++, SGRAF; every model also reads them): equal bit for bit on the hard
  setting, so never;
- the labelled, directed visual graph (SGM, SGFN read the predicate labels and which end is the
  subject): the changed relation's ``[subject, predicate, object]`` differs in every pair;
- CMSEI's explicit graphs (the paper's Sec. 3.1): the semantic relation graph is unlabelled and
  undirected ("the existence of semantic associations"), so only *which* regions are related
  counts, and the spatial graph keeps an edge where the boxes' IoU exceeds mu, a symmetric
  number; the pair's entries of both differ only where the related pair changes or its IoU
  crosses mu;
- box centres (MPSM's polar spatial graph reads the angle and distance from one region's centre
  to another's): the offset from the subject's to the object's centre turns by more than 45
  degrees.

Why: the comparison (``bench/compare_synthetic.py``) asks every model that reads boxes or graphs
to beat VSE++ on relation twins; this script says, from the data alone, where that is possible.
Writes ``RESULTS/twin_inputs.csv``. Usage: python bench/twin_inputs.py [--data DIR] [--split test]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np
import torch

from sgfused.models.cmsei import box_iou

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pair_inputs(boxes: np.ndarray, size: np.ndarray, graph: dict, subject: int, obj: int, mu: float) -> dict:
    """What the models read of the related pair ``(subject, obj)`` in one image."""
    normalised = torch.from_numpy(np.asarray(boxes, dtype=np.float64) / np.tile(size, 2))
    centres = (normalised[:, :2] + normalised[:, 2:]) / 2
    offset = centres[obj] - centres[subject]
    return {
        "relations": sorted(map(tuple, graph["rels"])),
        "associations": sorted({tuple(sorted((s, o))) for s, _, o in graph["rels"]}),
        "iou_edge": bool(box_iou(normalised[None])[0, subject, obj] > mu),
        "angle": math.atan2(offset[1].item(), offset[0].item()),
    }


def carried(base: dict, twin: dict, features_equal: bool) -> dict[str, bool]:
    """Per kind of model: do its image inputs differ between the base and the twin?"""
    turn = abs((twin["angle"] - base["angle"] + math.pi) % (2 * math.pi) - math.pi)
    return {
        "region features (VSE++, SGRAF)": not features_equal,
        "labelled directed graph (SGM, SGFN)": base["relations"] != twin["relations"] or not features_equal,
        "unlabelled graph + IoU edges (CMSEI)": (base["associations"] != twin["associations"]
                                                 or base["iou_edge"] != twin["iou_edge"] or not features_equal),
        "box centres, turn > 45 deg (MPSM)": turn > math.pi / 4 or not features_equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/sgfused_compare_hard", help="a synthetic dataset folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--iou-threshold", type=float, default=0.4, help="CMSEI's mu (the paper's 0.4)")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    path = lambda name: os.path.join(args.data, f"{args.split}_{name}")  # noqa: E731
    with open(path("distractors.json")) as handle:
        records = [r for r in json.load(handle) if r["differs"] != "attribute"]
    with open(path("ims_graphs.json")) as handle:
        graphs = json.load(handle)
    features = np.load(path("ims.npy"), mmap_mode="r")
    boxes, sizes = np.load(path("ims_bbx.npy"), mmap_mode="r"), np.load(path("ims_size.npy"))
    if not records:
        raise SystemExit(f"{path('distractors.json')}: no relation twins")
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        base, twin = record["twin_of"], record["image"]
        subject, _, obj = record["before"]
        seen = [pair_inputs(boxes[i], sizes[i], graphs[i], subject, obj, args.iou_threshold) for i in (base, twin)]
        for name, differs in carried(*seen, bool(np.array_equal(features[base], features[twin]))).items():
            tally = counts.setdefault(name, {"predicate": 0, "direction": 0})
            tally[record["differs"]] += int(differs)
    kinds = {k: sum(r["differs"] == k for r in records) for k in ("predicate", "direction")}
    rows = [{"image inputs": name, "predicate twins carried": f"{t['predicate']}/{kinds['predicate']}",
             "direction twins carried": f"{t['direction']}/{kinds['direction']}",
             "accuracy ceiling %": f"{50 + 50 * (t['predicate'] + t['direction']) / len(records):.1f}"}
            for name, t in counts.items()]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "twin_inputs.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(" | ".join(r.values()))


if __name__ == "__main__":
    main()
