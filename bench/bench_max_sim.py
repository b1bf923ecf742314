"""Benchmark max_sim (SGM's object- and relation-level matching) against the reference in one run.

Shapes (SGM): evaluation scores 1000 images x 5000 captions, object level
(36 region nodes x 12 word nodes) and relation level (26 relation nodes x 4
phrase nodes), d = 1024; training scores a 128 x 128 batch at both levels.
Lengths: the 36 object nodes always valid (precomp features have 36 regions),
relation nodes in [1, 26], caption nodes in [L/2, L] (seeded). The reference is
einsum + max, chunked over captions (sgfused.reference.max_sim).

Cases: "forward" (fp32, no grad: evaluation), "fwd+bwd" (fp32, training shapes
only: the reference's backward at the evaluation shape is hours of CPU), "bf16
forward" (the op on bf16 input) next to backend "torch.mm": a plain bf16 matmul
(4096 x 1024 @ 1024 x 4096) whose GFLOP/s is the rate to compare with.
GFLOP/s counts the forward's useful work, 2 d sum_a x_lens[a] sum_b y_lens[b] (fwd+bwd too).

Usage: python bench/bench_max_sim.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure  # noqa: E402

from sgfused.ops import max_sim  # noqa: E402

OP = sys.modules["sgfused.ops.max_sim"]

# name: (Nx, Lx, Ny, Ly, image nodes always full)
FULL = {
    "eval objects": (1000, 36, 5000, 12, True),
    "eval relations": (1000, 26, 5000, 4, False),
    "train objects": (128, 36, 128, 12, True),
    "train relations": (128, 26, 128, 4, False),
}
QUICK = {
    "eval objects": (20, 36, 100, 12, True),
    "eval relations": (20, 26, 100, 4, False),
    "train objects": (8, 36, 8, 12, True),
    "train relations": (8, 26, 8, 4, False),
}


def backends_for(device: torch.device) -> list[str]:
    """On a GPU also "auto" where both kernels exist: its measure rule's pick (the timing is in the warm-up)."""
    wanted = [b for b in (["reference", "cuda", "triton"] if device.type == "cuda" else ["reference", "cpu"])
              if b in OP._IMPLEMENTATIONS]
    return wanted + ["auto"] if {"cuda", "triton"} <= set(wanted) else wanted


def make(nx: int, lx: int, ny: int, ly: int, full_x: bool, d: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(nx, lx, d, generator=generator).to(device, dtype)
    y = torch.randn(ny, ly, d, generator=generator).to(device, dtype)
    x_lens = torch.full((nx,), lx) if full_x else torch.randint(1, lx + 1, (nx,), generator=generator)
    y_lens = torch.randint(max(1, ly // 2), ly + 1, (ny,), generator=generator)
    return x, y, x_lens.to(device), y_lens.to(device)


def useful_flop(x_lens: torch.Tensor, y_lens: torch.Tensor, d: int) -> float:
    return 2.0 * d * float(x_lens.sum()) * float(y_lens.sum())


def op_call(tensors, backend: str, backward: bool):
    x, y, x_lens, y_lens = tensors

    def call():
        if not backward:
            with torch.no_grad():
                return max_sim(x, y, x_lens, y_lens, backend=backend)
        xr, yr = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        scores = max_sim(xr, yr, x_lens, y_lens, backend=backend)
        scores.sum().backward()
        return scores

    return call


def matmul_row(device: torch.device, quick: bool) -> Row:
    n = 512 if quick else 4096
    a = torch.randn(n, 1024, device=device, dtype=torch.bfloat16)
    b = torch.randn(1024, n, device=device, dtype=torch.bfloat16)
    return measure("max_sim", "bf16 forward", "torch.mm", device, torch.bfloat16, f"{n}x1024 @ 1024x{n}",
                   lambda: a @ b, flop=2.0 * n * n * 1024)


def run(device: torch.device, quick: bool) -> list[Row]:
    d = 64 if quick else 1024
    rows = []
    for name, (nx, lx, ny, ly, full_x) in (QUICK if quick else FULL).items():
        shape = f"{name} {nx}x{lx} vs {ny}x{ly}"
        cases = [("forward", torch.float32, False), ("bf16 forward", torch.bfloat16, False)]
        if name.startswith("train"):
            cases.append(("fwd+bwd", torch.float32, True))
        for case, dtype, backward in cases:
            tensors = make(nx, lx, ny, ly, full_x, d, device, dtype)
            flop = useful_flop(tensors[2], tensors[3], d)
            for backend in backends_for(device):
                fn = op_call(tensors, backend, backward)
                rows.append(measure("max_sim", case, backend, device, dtype, shape, fn, flop=flop))
    rows.append(matmul_row(device, quick))
    add_ratios(rows)
    return rows


if __name__ == "__main__":
    main("max_sim", run, __doc__)
