"""Benchmark the SGRAF model end to end: batched similarity through sgfused.ops vs the published loop and the reference.

Paper dimensions: embed 1024, sim 256, 36 regions, word_dim 300, img_dim 2048,
captions of 9-15 tokens (about 12), vocabulary 8481 (Flickr30K).
Evaluation: the similarity matrix of 100 images x 500 captions (1000 x 5000 on a
GPU) in eval mode, SGR and SAF: the published per-caption loop
(``sgraf_loop_similarity``, fp32), ours (fp32; on a GPU also fp32 under TF32,
dtype "tf32"; and bf16 inputs to the similarity ops and the reasoning's matrix
products); pairs/s and the largest score difference from the loop. Training: one Adam step (forward, hardest-negative loss, backward, clip 2.0,
step) at batch 128, SGR, ours vs ``reference=True`` (the same batched math on the
reference ops, no recomputation). Speedup and memory columns are relative to the
loop (evaluation) or the reference (training), measured in the same run.
Usage: python bench/bench_sgraf.py [--device cuda] [--quick]
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, fused_label, main, measure, measure_call, tf32, train_step  # noqa: E402

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch  # noqa: E402
from sgfused.models.sgraf import SGRAF, sgraf_loop_similarity  # noqa: E402
from sgfused.reference import l2norm  # noqa: E402

OP = "sgraf"
PAPER = dict(embed_size=1024, sim_dim=256, word_dim=300, img_dim=2048, num_regions=36)
QUICK = dict(embed_size=64, sim_dim=32, word_dim=32, img_dim=48, num_regions=12)
VOCAB = 8481
TOKENS = (9, 15)  # caption lengths, <start> and <end> included


def lengths(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(TOKENS[0], TOKENS[1] + 1, (n,), generator=g)


def eval_inputs(n_img: int, n_cap: int, dims: dict, device: torch.device):
    """Encoder outputs as the model produces them: l2-normalised regions and words, zero past each length."""
    g = torch.Generator().manual_seed(0)
    regions = l2norm(torch.randn(n_img, dims["num_regions"], dims["embed_size"], generator=g))
    lens = lengths(n_cap, g)
    words = l2norm(torch.randn(n_cap, int(lens.max()), dims["embed_size"], generator=g))
    words[torch.arange(words.shape[1]) >= lens[:, None]] = 0
    return regions.to(device), words.to(device), lens.to(device)


def train_batch(n: int, dims: dict, device: torch.device) -> PairBatch:
    g = torch.Generator().manual_seed(1)
    features = torch.rand(n, dims["num_regions"], dims["img_dim"], generator=g)
    lens = lengths(n, g)
    ids = torch.randint(4, VOCAB, (n, int(lens.max())), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    index = torch.arange(n)
    return PairBatch(ImageBatch(features, index), CaptionBatch(ids, lens, index, index)).to(device)


def relative_to(base: Row, rows: list[Row]) -> None:
    """Fill the speedup and memory columns against ``base`` (the loop or the reference, whatever the dtype)."""
    for r in rows:
        r.speedup_vs_reference = base.ms / r.ms
        r.memory_vs_reference = r.peak_mib / base.peak_mib if base.peak_mib > 0 else float("nan")


def eval_rows(device: torch.device, quick: bool) -> list[Row]:
    dims = QUICK if quick else PAPER
    n_img, n_cap = (20, 100) if quick else ((1000, 5000) if device.type == "cuda" else (100, 500))
    regions, words, lens = eval_inputs(n_img, n_cap, dims, device)
    shape = f"{n_img}img x {n_cap}cap"
    rows = []
    fused = fused_label(device)
    for module in ("SGR", "SAF"):
        torch.manual_seed(0)
        model = SGRAF(VOCAB, module=module, **dims).to(device).eval()
        case = f"eval {module} similarity"
        paths = {
            ("loop", "float32"): lambda: sgraf_loop_similarity(model, regions, words, lens),
            (fused, "float32"): lambda: model.similarity(regions, words, lens),
            (fused, "bfloat16"): lambda: model.similarity(regions, words, lens, dtype=torch.bfloat16),
        }
        if device.type == "cuda":
            paths[(fused, "tf32")] = tf32(paths[(fused, "float32")])
        scores = {}
        with torch.no_grad():
            for (backend, precision), fn in paths.items():
                row, scores[(backend, precision)] = measure_call(OP, case, backend, device, precision, shape, fn)
                rows.append(row)
        loop = scores[("loop", "float32")]
        for (backend, precision), value in scores.items():
            diff = (value - loop).abs().max().item()
            print(f"{case}: {backend:5s} {precision:9s} max |score - loop| = {diff:.2e}")
        relative_to(rows[-len(paths)], rows[-len(paths):])
        for r in rows[-len(paths):]:
            print(f"{case}: {r.backend:5s} {r.dtype:9s} {n_img * n_cap / (r.ms / 1e3):10.0f} pairs/s, "
                  f"{r.speedup_vs_reference:.2f}x the loop")
    return rows


def train_rows(device: torch.device, quick: bool) -> list[Row]:
    dims = QUICK if quick else PAPER
    n = 16 if quick else 128
    batch = train_batch(n, dims, device)
    torch.manual_seed(0)
    fused = SGRAF(VOCAB, module="SGR", **dims).to(device).train()
    reference = copy.deepcopy(fused)
    reference.reference = True
    shape = f"batch {n}, embed {dims['embed_size']}, sim {dims['sim_dim']}"
    rows = [
        measure(OP, "train SGR Adam step", "reference", device, torch.float32, shape, train_step(reference, batch)),
        measure(OP, "train SGR Adam step", fused_label(device), device, torch.float32, shape, train_step(fused, batch)),
    ]
    relative_to(rows[0], rows)
    for r in rows:
        print(f"train step {r.backend:9s} {r.ms / 1e3:8.2f} s  {r.peak_mib:9.1f} MiB  "
              f"time {1 / r.speedup_vs_reference:.2f}x, memory {r.memory_vs_reference:.3f}x the reference")
    return rows


def run(device: torch.device, quick: bool) -> list[Row]:
    return eval_rows(device, quick) + train_rows(device, quick)


if __name__ == "__main__":
    main(OP, run, __doc__)
