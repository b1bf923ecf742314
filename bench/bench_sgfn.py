"""Benchmark the SGFN model end to end: evaluation throughput and one training step, fused vs reference.

Data: a synthetic scene dataset (``sgfused.data.synthetic.generate``, 36 regions of
2048-d features, its visual and caption graphs), written once to a temporary folder.
Evaluation: encode 100 images and 500 captions and score every pair (``fusion="full"``,
the model as published, and ``"intra"``, where the local alignment of all pairs is one
``cross_attention`` call per direction), forward only; pairs/s. Training: one step
(loss, backward) at batch 64 with ``fusion="full"``; ms and peak memory.
"fused" runs the ops on the compiled kernels, "reference" with ``reference=True``.
Full runs use the paper's sizes (embed 1024, word 300, 8 heads); ``--quick`` embed 128
on 20 images x 100 captions and batch 16.
Usage: python bench/bench_sgfn.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure, measure_call  # noqa: E402

from sgfused.data.precomp import PrecompSplit, collate_captions, collate_images, collate_pairs  # noqa: E402
from sgfused.data.synthetic import generate  # noqa: E402
from sgfused.data.vocab import Vocabulary  # noqa: E402
from sgfused.models.sgfn import SGFN  # noqa: E402

OP = "sgfn"
BACKENDS = {"fused": False, "reference": True}


def dataset(root: str, n_images: int) -> tuple[PrecompSplit, Vocabulary]:
    """The train split of a fresh synthetic dataset with ``n_images`` images (80 % of the generated ones)."""
    generate(root, n_images * 5 // 4, seed=0, feature_dim=2048, progress=False)
    vocab = Vocabulary.load(os.path.join(root, "vocab.json"))
    return PrecompSplit(root, "train", vocab, image_graphs=True, caption_graphs=True), vocab


def model_for(vocab: Vocabulary, dims: dict, fusion: str, reference: bool, device: torch.device) -> SGFN:
    torch.manual_seed(0)
    model = SGFN(len(vocab), fusion=fusion, reference=reference, **dims).to(device)
    model.set_vocabulary(vocab)
    return model


def run(device: torch.device, quick: bool) -> list[Row]:
    dims = dict(embed_size=128, word_dim=64, heads=2) if quick else dict(embed_size=1024, word_dim=300, heads=8)
    n_img, n_cap, batch = (20, 100, 16) if quick else (100, 500, 64)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as root:
        split, vocab = dataset(root, n_img)
        images = collate_images([split.image(i) for i in range(n_img)]).to(device)
        captions = collate_captions([split.caption(k) for k in range(n_cap)]).to(device)
        pairs = collate_pairs([split[k] for k in range(0, batch * 5, 5)]).to(device)  # distinct images
        shape = f"{n_img}img x {n_cap}cap, d={dims['embed_size']}"
        scores = {}
        for fusion in ("full", "intra"):
            for backend, reference in BACKENDS.items():
                model = model_for(vocab, dims, fusion, reference, device).eval()

                @torch.no_grad()
                def evaluate(model=model):
                    return model.similarity(model.encode_images(images), model.encode_captions(captions))

                row, scores[(fusion, backend)] = measure_call(OP, f"eval {fusion}", backend, device, torch.float32,
                                                              shape, evaluate)
                rows.append(row)
                print(f"  {n_img * n_cap / (row.ms / 1e3):10.0f} pairs/s", flush=True)
        for fusion in ("full", "intra"):
            diff = (scores[(fusion, "fused")] - scores[(fusion, "reference")]).abs().max().item()
            print(f"eval {fusion}: max |fused - reference| = {diff:.2e}")
        for backend, reference in BACKENDS.items():
            model = model_for(vocab, dims, "full", reference, device).train()

            def step(model=model):
                model.zero_grad(set_to_none=True)
                model.loss(pairs).backward()

            rows.append(measure(OP, "train step full", backend, device, torch.float32,
                                f"batch {batch}, d={dims['embed_size']}", step))
    add_ratios(rows)
    return rows


if __name__ == "__main__":
    main(OP, run, __doc__)
