"""Benchmark pairwise_similarity against the naive reference (broadcast difference -> Linear -> l2norm).

Cases: SGRAF training shape (Nx = Ny = 128, d = 1024, m = 256; forward and
forward+backward, fp32, bf16 and on a GPU fp32 under TF32), memory at 1000 x 1000 (forward), and the
evaluation shape 1000 images x 5000 captions computed in chunks of 100 images,
each chunk reduced to a score (as SGRAF's sim_eval_w does) so that the
(1000, 5000, 256) result never exists whole. The plain torch.mm rate of this
device for the same GEMM (fp32 and bf16) is measured in the same run.
Usage: python bench/bench_pairwise_similarity.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure, tf32  # noqa: E402

from sgfused.ops import pairwise_similarity  # noqa: E402

OP = "pairwise_similarity"


def backends_for(device: torch.device) -> list[str]:
    """On a GPU also "auto": its measure rule's pick, timed as a user gets it (the timing is in the warm-up)."""
    return ["reference", "cuda", "triton", "auto"] if device.type == "cuda" else ["reference", "cpu"]


def inputs(nx: int, ny: int, d: int, m: int, device: torch.device, dtype: torch.dtype):
    return (
        torch.randn(nx, d, device=device, dtype=dtype),
        torch.randn(ny, d, device=device, dtype=dtype),
        (torch.randn(m, d, device=device) / d**0.5).to(dtype),
        torch.zeros(m, device=device, dtype=dtype),
    )


def call(tensors, backend: str, backward: bool, mode: str = "distance"):
    def run():
        leaves = [t.detach().requires_grad_(backward) for t in tensors]
        out = pairwise_similarity(*leaves, mode, backend=backend)
        if backward:
            out.sum().backward()
        return out

    return run


def chunked_scores(tensors, backend: str, chunk: int):
    """Evaluation: (Nx, Ny) scores through (chunk, Ny, m) similarity blocks reduced by a Linear(m, 1)."""
    x, y, w, b = tensors
    reduce = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)

    @torch.no_grad()
    def run():
        return torch.cat([pairwise_similarity(x[i : i + chunk], y, w, b, backend=backend) @ reduce
                          for i in range(0, x.shape[0], chunk)])

    return run


def matmul_rate(rows: list[Row], device, dtype, pairs: int, d: int, m: int) -> None:
    a = torch.randn(pairs, d, device=device).to(dtype)
    b = torch.randn(d, m, device=device).to(dtype)
    rows.append(measure(OP, f"plain mm {str(dtype)[6:]}", "torch.mm", device, dtype, f"{pairs}x{d}x{m}",
                        lambda: a @ b, flop=2.0 * pairs * d * m))


def run(device: torch.device, quick: bool) -> list[Row]:
    rows: list[Row] = []
    n, d, m = (32, 256, 64) if quick else (128, 1024, 256)
    flop = 2.0 * n * n * d * m
    precisions = ("float32", "tf32", "bfloat16") if device.type == "cuda" else ("float32", "bfloat16")
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        tensors = inputs(n, n, d, m, device, dtype)
        for backward, case in ((False, "train fwd"), (True, "train fwd+bwd")):
            for backend in backends_for(device):
                fn = call(tensors, backend, backward)
                rows.append(measure(OP, f"{case} {precision}", backend, device, precision, f"{n}x{n},d={d},m={m}",
                                    tf32(fn) if precision == "tf32" else fn, flop=flop * (3 if backward else 1)))
        if precision != "tf32":
            matmul_rate(rows, device, dtype, n * n, d, m)
    big = 200 if quick else 1000
    tensors = inputs(big, big, d, m, device, torch.float32)
    for backend in backends_for(device):
        rows.append(measure(OP, "memory fwd", backend, device, torch.float32, f"{big}x{big},d={d},m={m}",
                            call(tensors, backend, False), flop=2.0 * big * big * d * m))
    ny = 5 * big
    tensors = inputs(big, ny, d, m, device, torch.float32)
    for backend in backends_for(device):
        rows.append(measure(OP, "eval chunked fwd", backend, device, torch.float32, f"{big}x{ny},d={d},m={m}",
                            chunked_scores(tensors, backend, 100), flop=2.0 * big * ny * d * m))
    add_ratios(rows)
    return rows


if __name__ == "__main__":
    main(OP, run, __doc__)
