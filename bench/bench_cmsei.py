"""Benchmark the CMSEI model: tiled similarity through sgfused.ops vs the same math on the reference ops.

Paper dimensions: embed 1024, 36 regions, word_dim 300, img_dim 2048, captions of 9-15
tokens, vocabulary 8481 (Flickr30K). Evaluation: the similarity matrix of 20 images x
100 captions on the CPU (1000 x 5000 on a GPU; on 2 CPU cores the reference takes over
two minutes a call at 100 x 500, and a timing is seven calls) from the encodings (the graphs run once per image /
caption in the encoders), eval mode, "i2t" and "t2i": ours vs ``reference=True``;
pairs/s, peak memory and the largest score difference. The memory bound: the same call
on twice the captions must not need more memory beyond the larger score matrix (a row
"x2 captions" per direction). Training: one Adam step (encoders, similarity,
hardest-negative loss, backward, clip 2.0, step) at the recipe's batch 64 on a GPU, 16 on
the CPU, "i2t".
Speedup and memory columns are relative to the reference measured in the same run.
Usage: python bench/bench_cmsei.py [--device cuda] [--quick]
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, fused_label, main, measure, measure_call, train_step  # noqa: E402
from bench_sgraf import PAPER, QUICK, TOKENS, VOCAB  # noqa: E402  (the same sizes as SGRAF's benchmark)

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch  # noqa: E402
from sgfused.models.cmsei import CMSEI  # noqa: E402

OP = "cmsei"


def dims(quick: bool) -> dict:
    sizes = QUICK if quick else PAPER
    return {k: sizes[k] for k in ("embed_size", "word_dim", "img_dim", "num_regions")}


def captions(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.randint(TOKENS[0], TOKENS[1] + 1, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, int(lens.max())), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    return ids, lens


def images(n: int, sizes: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Features, boxes (many overlapping) and a scene graph of 8 random relations per image."""
    k = sizes["num_regions"]
    features = torch.rand(n, k, sizes["img_dim"], generator=g)
    corner = torch.rand(n, k, 2, generator=g) * 0.5
    boxes = torch.cat([corner, corner + 0.2 + 0.3 * torch.rand(n, k, 2, generator=g)], dim=-1)
    pairs = torch.randint(0, k, (n, 8, 2), generator=g).tolist()
    graphs = [{"rels": [[s, "near", o] for s, o in image if s != o]} for image in pairs]
    return features, boxes, graphs


def eval_rows(device: torch.device, quick: bool) -> list[Row]:
    sizes = dims(quick)
    n_img, n_cap = (6, 20) if quick else ((1000, 5000) if device.type == "cuda" else (20, 100))
    g = torch.Generator().manual_seed(0)
    features, boxes, graphs = images(n_img, sizes, g)
    ids, lens = captions(2 * n_cap, g)
    rows = []
    for direction in ("i2t", "t2i"):
        torch.manual_seed(0)
        # quick: small tiles, so that the smoke run also crosses tile borders (the memory bound)
        model = CMSEI(VOCAB, direction=direction, chunk_fragments=256 if quick else None, **sizes).to(device).eval()
        reference = copy.deepcopy(model)
        reference.reference = True
        with torch.no_grad():
            image_enc = model.encode_image(features.to(device), boxes.to(device), graphs)
            caption_enc = model.encode_text(ids.to(device), lens.to(device))
            half = tuple(t[:n_cap] for t in caption_enc)
            case = f"eval {direction} similarity"
            scores = {}
            for name, m in (("reference", reference), (fused_label(device), model)):
                row, scores[name] = measure_call(OP, case, name, device, torch.float32, f"{n_img}img x {n_cap}cap",
                                                 lambda m=m: m.similarity(image_enc, half))
                rows.append(row)
            double = measure(OP, f"{case} x2 captions", fused_label(device), device, torch.float32,
                             f"{n_img}img x {2 * n_cap}cap", lambda: model.similarity(image_enc, caption_enc))
        diff = (scores[fused_label(device)] - scores["reference"]).abs().max().item()
        extra = 4 * n_img * n_cap / 2**20  # the larger score matrix
        print(f"{case}: max |score - reference| = {diff:.2e}; peak {rows[-1].peak_mib:.1f} MiB at {n_cap} captions, "
              f"{double.peak_mib:.1f} MiB at {2 * n_cap} (score matrix +{extra:.1f} MiB)")
        rows.append(double)
    add_ratios(rows)
    for r in rows:
        pairs = n_img * n_cap * (2 if "x2" in r.case else 1)
        print(f"{r.case}: {r.backend:9s} {pairs / (r.ms / 1e3):10.0f} pairs/s, "
              f"{r.speedup_vs_reference:.2f}x the reference, memory {r.memory_vs_reference:.3f}x")
    return rows


def train_rows(device: torch.device, quick: bool) -> list[Row]:
    sizes = dims(quick)
    n = 4 if quick else (64 if device.type == "cuda" else 16)
    g = torch.Generator().manual_seed(1)
    features, boxes, graphs = images(n, sizes, g)
    ids, lens = captions(n, g)
    index = torch.arange(n)
    batch = PairBatch(ImageBatch(features, index, boxes, graphs), CaptionBatch(ids, lens, index, index)).to(device)
    torch.manual_seed(0)
    fused = CMSEI(VOCAB, direction="i2t", **sizes).to(device).train()
    reference = copy.deepcopy(fused)
    reference.reference = True
    shape = f"batch {n}, embed {sizes['embed_size']}"
    rows = [
        measure(OP, "train i2t Adam step", "reference", device, torch.float32, shape, train_step(reference, batch)),
        measure(OP, "train i2t Adam step", fused_label(device), device, torch.float32, shape, train_step(fused, batch)),
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
