"""Benchmark hardest_negative_loss: every backend against the reference in one run.

Cases: max-violation forward and forward+backward on a score matrix for
N in {128, 1024, 4096, 16384}, the sum of hinges at N <= 4096, and the embedding
entry point at d = 1024. The published VSE++ ContrastiveLoss is measured too
(backend "vsepp"). Usage: python bench/bench_hardest_negative.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure  # noqa: E402

from sgfused import reference  # noqa: E402
from sgfused.ops import hardest_negative_loss, hardest_negative_loss_from_embeddings  # noqa: E402


def backends_for(device: torch.device) -> list[str]:
    """On a GPU also "auto": its measure rule's pick, timed as a user gets it (the timing is in the warm-up)."""
    return ["reference", "cuda", "triton", "auto"] if device.type == "cuda" else ["reference", "cpu"]


def scores_call(scores: torch.Tensor, backend: str, max_violation: bool, backward: bool):
    def call():
        leaf = scores.detach().requires_grad_(backward)
        if backend == "vsepp":
            loss = reference.vsepp_contrastive_loss(leaf, 0.2, max_violation)
        else:
            loss = hardest_negative_loss(leaf, 0.2, max_violation=max_violation, backend=backend)
        if backward:
            loss.backward()
        return loss

    return call


def embed_call(img: torch.Tensor, cap: torch.Tensor, backend: str):
    def call():
        i, c = img.detach().requires_grad_(True), cap.detach().requires_grad_(True)
        loss = hardest_negative_loss_from_embeddings(i, c, 0.2, backend=backend)
        loss.backward()
        return loss

    return call


def run(device: torch.device, quick: bool) -> list[Row]:
    sizes = [128, 1024] if quick else [128, 1024, 4096, 16384]
    embed_sizes = [1024] if quick else [4096, 16384]
    dtype = torch.float32
    rows = []
    for n in sizes:
        scores = torch.randn(n, n, device=device, dtype=dtype)
        for max_violation, backward, case in [
            (True, False, "max_violation fwd"),
            (True, True, "max_violation fwd+bwd"),
            (False, True, "sum_of_hinges fwd+bwd"),
        ]:
            if not max_violation and n > 4096:
                continue
            for backend in ["vsepp"] + backends_for(device):
                fn = scores_call(scores, backend, max_violation, backward)
                rows.append(measure("hardest_negative_loss", case, backend, device, dtype, f"N={n}", fn))
    for n in embed_sizes:
        img = torch.nn.functional.normalize(torch.randn(n, 1024, device=device, dtype=dtype), dim=1)
        cap = torch.nn.functional.normalize(torch.randn(n, 1024, device=device, dtype=dtype), dim=1)
        for backend in backends_for(device):
            if backend in ("cuda", "auto"):
                continue  # the embedding entry point runs on Triton for CUDA tensors
            fn = embed_call(img, cap, backend)
            rows.append(measure("hardest_negative_loss", "embeddings fwd+bwd", backend, device, dtype, f"N={n},d=1024", fn))
    add_ratios(rows)
    return rows


if __name__ == "__main__":
    main("hardest_negative_loss", run, __doc__)
