"""Benchmark the MPSM model end to end: batched similarity through sgfused.ops vs the same math on the reference ops.

Paper dimensions: embed 1024, sim 256, 36 regions, word_dim 300, img_dim 2048, 3 KGID
layers, captions of 9-15 tokens (about 12), vocabulary 8481 (Flickr30K).
Evaluation: the similarity matrix of 100 images x 500 captions (1000 x 5000 on a GPU)
from the encodings (KGID and pooling run once per image / caption in the encoders, so
they are not part of it), eval mode, "distance" and "direction": ours vs
``reference=True``; pairs/s and the largest score difference. Training: one Adam step
(encoders with KGID, similarity, hardest-negative loss, backward, clip 2.0, step) at
batch 128, "distance", ours vs ``reference=True`` (no recomputation). Speedup and memory
columns are relative to the reference measured in the same run.
Usage: python bench/bench_mpsm.py [--device cuda] [--quick]
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, fused_label, main, measure, measure_call, train_step  # noqa: E402
from bench_sgraf import PAPER, QUICK, TOKENS, VOCAB  # noqa: E402  (MPSM is benchmarked at SGRAF's sizes)

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch  # noqa: E402
from sgfused.models.mpsm import MPSM  # noqa: E402

OP = "mpsm"


def captions(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Random ids, lengths and dependency trees (each token's head an earlier token; token 0 the root)."""
    lens = torch.randint(TOKENS[0], TOKENS[1] + 1, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, int(lens.max())), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    graphs = []
    for length in lens.tolist():
        heads = [-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, length - 2)]
        graphs.append({"heads": heads})
    return ids, lens, graphs


def images(n: int, dims: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.rand(n, dims["num_regions"], dims["img_dim"], generator=g)
    corner = torch.rand(n, dims["num_regions"], 2, generator=g) * 0.7
    boxes = torch.cat([corner, corner + 0.05 + 0.25 * torch.rand(n, dims["num_regions"], 2, generator=g)], dim=-1)
    return features, boxes


def eval_rows(device: torch.device, quick: bool) -> list[Row]:
    dims = QUICK if quick else PAPER
    n_img, n_cap = (20, 100) if quick else ((1000, 5000) if device.type == "cuda" else (100, 500))
    g = torch.Generator().manual_seed(0)
    features, boxes = images(n_img, dims, g)
    ids, lens, graphs = captions(n_cap, g)
    shape = f"{n_img}img x {n_cap}cap"
    rows = []
    for perspective in ("distance", "direction"):
        torch.manual_seed(0)
        model = MPSM(VOCAB, perspective=perspective, **dims).to(device).eval()
        reference = copy.deepcopy(model)
        reference.reference = True
        with torch.no_grad():
            encoded = (model.encode_image(features.to(device), boxes.to(device)),
                       model.encode_text(ids.to(device), lens.to(device), graphs))
            case = f"eval {perspective} similarity"
            scores = {}
            for name, m in (("reference", reference), (fused_label(device), model)):
                row, scores[name] = measure_call(OP, case, name, device, torch.float32, shape,
                                                 lambda m=m: m.similarity(*encoded))
                rows.append(row)
        diff = (scores[fused_label(device)] - scores["reference"]).abs().max().item()
        print(f"{case}: max |score - reference| = {diff:.2e}")
    add_ratios(rows)
    for r in rows:
        print(f"{r.case}: {r.backend:9s} {n_img * n_cap / (r.ms / 1e3):10.0f} pairs/s, "
              f"{r.speedup_vs_reference:.2f}x the reference, memory {r.memory_vs_reference:.3f}x")
    return rows


def train_rows(device: torch.device, quick: bool) -> list[Row]:
    dims = QUICK if quick else PAPER
    n = 16 if quick else 128
    g = torch.Generator().manual_seed(1)
    features, boxes = images(n, dims, g)
    ids, lens, graphs = captions(n, g)
    index = torch.arange(n)
    batch = PairBatch(ImageBatch(features, index, boxes), CaptionBatch(ids, lens, index, index, graphs)).to(device)
    torch.manual_seed(0)
    fused = MPSM(VOCAB, perspective="distance", **dims).to(device).train()
    reference = copy.deepcopy(fused)
    reference.reference = True
    shape = f"batch {n}, embed {dims['embed_size']}, sim {dims['sim_dim']}"
    rows = [
        measure(OP, "train distance Adam step", "reference", device, torch.float32, shape, train_step(reference, batch)),
        measure(OP, "train distance Adam step", fused_label(device), device, torch.float32, shape, train_step(fused, batch)),
    ]
    add_ratios(rows)
    for r in rows:
        print(f"train step {r.backend:9s} {r.ms / 1e3:8.2f} s  {r.peak_mib:9.1f} MiB  "
              f"time {1 / r.speedup_vs_reference:.2f}x, memory {r.memory_vs_reference:.3f}x the reference")
    return rows


def run(device: torch.device, quick: bool) -> list[Row]:
    return eval_rows(device, quick) + train_rows(device, quick)


if __name__ == "__main__":
    main(OP, run, __doc__)
