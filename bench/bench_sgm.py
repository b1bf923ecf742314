"""Benchmark the SGM model end to end: 1000 x 5000 evaluation throughput and one training step, fused vs reference.

Data: a synthetic scene dataset (``sgfused.data.synthetic.generate``, 36 regions of
2048-d features, visual and caption graphs, relation features), written once to a
temporary folder; the batches are collated before timing, so no file reading is timed.
Cases:

* ``eval``: what ``sgfused eval`` does (:func:`sgfused.evaluate.similarity_matrix`):
  encode every image and caption once (batches of 128) and score all pairs; pairs/s.
* ``score``: only the scoring of all pairs from the cached encodings (two ``max_sim``
  calls, the part that grows with images x captions); pairs/s.
* ``train step``: loss, backward, clip, Adam at batch 128.

"fused" runs ``max_sim`` on its compiled kernels, "reference" with ``reference=True``.
Full runs use the paper's sizes (embed 1024, word 300) on 1000 images x 5000 captions;
``--quick`` embed 64 on 20 images x 100 captions and batch 16.
Usage: python bench/bench_sgm.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure, measure_call, train_step  # noqa: E402

from sgfused.data.precomp import PrecompSplit, collate_captions, collate_images, collate_pairs  # noqa: E402
from sgfused.data.synthetic import generate  # noqa: E402
from sgfused.data.vocab import Vocabulary  # noqa: E402
from sgfused.evaluate import similarity_matrix  # noqa: E402
from sgfused.models.sgm import SGM  # noqa: E402

OP = "sgm"
BACKENDS = {"fused": False, "reference": True}
BATCH = 128  # encoding batch of the evaluation


def dataset(root: str, n_images: int) -> tuple[PrecompSplit, Vocabulary]:
    """The train split of a fresh synthetic dataset with ``n_images`` images (80 % of the generated ones)."""
    generate(root, n_images * 5 // 4, seed=0, feature_dim=2048, progress=False)
    vocab = Vocabulary.load(os.path.join(root, "vocab.json"))
    parts = {part: True for part in SGM.data_requirements}
    return PrecompSplit(root, "train", vocab, **parts), vocab


def model_for(vocab: Vocabulary, dims: dict, reference: bool, device: torch.device) -> SGM:
    torch.manual_seed(0)
    model = SGM(len(vocab), reference=reference, **dims).to(device)
    model.set_vocabulary(vocab)
    return model


def run(device: torch.device, quick: bool) -> list[Row]:
    dims = dict(embed_size=64, word_dim=32) if quick else dict(embed_size=1024, word_dim=300)
    n_img, n_cap, batch = (20, 100, 16) if quick else (1000, 5000, 128)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as root:
        split, vocab = dataset(root, n_img)
        image_batches = [collate_images([split.image(i) for i in range(s, min(s + BATCH, n_img))]) for s in range(0, n_img, BATCH)]
        caption_batches = [collate_captions([split.caption(k) for k in range(s, min(s + BATCH, n_cap))])
                           for s in range(0, n_cap, BATCH)]
        images = collate_images([split.image(i) for i in range(n_img)]).to(device)
        captions = collate_captions([split.caption(k) for k in range(n_cap)]).to(device)
        pairs = collate_pairs([split[k] for k in range(0, batch * 5, 5)]).to(device)  # distinct images
        shape = f"{n_img}img x {n_cap}cap, d={dims['embed_size']}"
        scores = {}
        for backend, reference in BACKENDS.items():
            model = model_for(vocab, dims, reference, device).eval()

            def evaluate(model=model):
                return similarity_matrix(model, image_batches, caption_batches, device=device, progress=False)

            row, scores[backend] = measure_call(OP, "eval", backend, device, torch.float32, shape, evaluate)
            rows.append(row)
            print(f"  {n_img * n_cap / (row.ms / 1e3):12.0f} pairs/s", flush=True)
            with torch.no_grad():
                encoded = model.encode_images(images), model.encode_captions(captions)

            @torch.no_grad()
            def score(model=model, encoded=encoded):
                return model.similarity(*encoded)

            row = measure(OP, "score", backend, device, torch.float32, shape, score)
            rows.append(row)
            print(f"  {n_img * n_cap / (row.ms / 1e3):12.0f} pairs/s", flush=True)
        diff = (scores["fused"] - scores["reference"]).abs().max().item()
        print(f"eval: max |fused - reference| = {diff:.2e}")
        for backend, reference in BACKENDS.items():
            model = model_for(vocab, dims, reference, device).train()
            rows.append(measure(OP, "train step", backend, device, torch.float32,
                                f"batch {batch}, d={dims['embed_size']}", train_step(model, pairs)))
    add_ratios(rows)
    return rows


if __name__ == "__main__":
    main(OP, run, __doc__)
