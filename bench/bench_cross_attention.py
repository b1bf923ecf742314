"""Benchmark cross_attention at SGRAF shapes against the batched reference in one run.

Training: Nq = Nc = 128 (captions x images), Lq = 32 padded with lengths 8-20,
Lc = 36 regions, d = 1024, m = 256, "distance" epilogue, forward+backward.
Evaluation: 100 images x 500 captions (1000 x 5000 on a GPU), forward, in chunks of
captions, each chunk reduced to one score per pair (as SGRAF's sim_eval_w does), fp32
and bf16 inputs; pairs/s, GFLOP/s, and the largest score difference of bf16 from fp32.
On a GPU both cases are also timed with fp32 inputs under TF32 (dtype "tf32": the
reference's matmuls and the kernels' products alike, ``harness.tf32``). The bf16 evaluation is
also timed with the Triton forward at one pair per program ("triton-1pair"), against its default
of several pairs sharing each chunk of W (``GROUP_ROWS``).
The device's plain fp32 and bf16 matmul rates are measured in the same harness.
Usage: python bench/bench_cross_attention.py [--device cuda] [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Row, add_ratios, main, measure, measure_call, tf32  # noqa: E402

from sgfused.ops import cross_attention  # noqa: E402

OP = "cross_attention"


def backends_for(device: torch.device) -> list[str]:
    return ["reference", "cuda", "triton"] if device.type == "cuda" else ["reference", "cpu"]


def flop_per_pair(lens: torch.Tensor, lc: int, d: int, m: int) -> float:
    """Scores, weighted contexts and the W projection of one pair (forward), for the mean valid query length."""
    lq = float(lens.float().mean())
    return 2.0 * lq * lc * d * 2 + 2.0 * lq * d * m


def make(nq, nc, lq, lc, d, m, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(nq, lq, d, generator=g).to(device, dtype)
    regions = torch.randn(nc, lc, d, generator=g).to(device, dtype)
    lens = torch.randint(8, 21, (nq,), generator=g).clamp(max=lq).to(device)
    weight = (torch.randn(m, d, generator=g) / d**0.5).to(device, dtype)
    bias = torch.zeros(m, device=device, dtype=dtype)
    return words, regions, lens, weight, bias


def train_step(tensors, backend: str):
    words, regions, lens, weight, bias = tensors

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (words, regions, weight, bias)]
        out = cross_attention(leaves[0], leaves[1], query_lens=lens, epilogue="distance", weight=leaves[2],
                              bias=leaves[3], backend=backend)
        out.sum().backward()
        return out

    return run


def eval_scores(tensors, backend: str, chunk: int):
    words, regions, lens, weight, bias = tensors
    reduce = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)).to(words.device, words.dtype)

    @torch.no_grad()
    def run():
        scores = []
        for i in range(0, words.shape[0], chunk):
            local = cross_attention(words[i : i + chunk], regions, query_lens=lens[i : i + chunk],
                                    epilogue="distance", weight=weight, bias=bias, backend=backend)
            scores.append((local @ reduce).float().sum(-1))  # (chunk, n_image)
        return torch.cat(scores)

    return run


def one_pair_per_program(fn):
    """fn with the Triton forward at one pair (a, b) per program instead of a group sharing W."""
    from sgfused.triton import cross_attention as kernels

    def run():
        saved, kernels.GROUP_ROWS = kernels.GROUP_ROWS, 1
        try:
            return fn()
        finally:
            kernels.GROUP_ROWS = saved

    return run


def run(device: torch.device, quick: bool) -> list[Row]:
    rows: list[Row] = []
    lq, lc, d, m = (32, 36, 1024, 256) if not quick else (16, 12, 64, 32)
    n = 16 if quick else 128
    tensors = make(n, n, lq, lc, d, m, device, torch.float32)
    flop = 3 * n * n * flop_per_pair(tensors[2], lc, d, m)
    precisions = ("float32", "tf32") if device.type == "cuda" else ("float32",)
    for precision in precisions:
        # "auto": its measure rule's pick, timed as a user gets it (the timing is in the warm-up call)
        for backend in backends_for(device) + (["auto"] if device.type == "cuda" else []):
            fn = train_step(tensors, backend)
            rows.append(measure(OP, "train fwd+bwd fp32", backend, device, precision,
                                f"{n}x{n},Lq={lq},Lc={lc},d={d},m={m}", tf32(fn) if precision == "tf32" else fn, flop=flop))
    n_img, n_cap = (20, 100) if quick else ((1000, 5000) if device.type == "cuda" else (100, 500))
    shape = f"{n_img}img x {n_cap}cap"
    scores = {}
    for precision in precisions + ("bfloat16",):
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        tensors = make(n_cap, n_img, lq, lc, d, m, device, dtype)
        flop = n_img * n_cap * flop_per_pair(tensors[2], lc, d, m)
        grouping_off = ["triton-1pair"] if device.type == "cuda" and dtype == torch.bfloat16 else []
        for backend in backends_for(device) + grouping_off:
            if dtype == torch.bfloat16 and backend == "reference":
                continue  # the target compares bf16 kernels with the fp32 reference
            if backend == "triton-1pair":
                fn = one_pair_per_program(eval_scores(tensors, "triton", 50))
            else:
                fn = eval_scores(tensors, backend, 50)
            row, scores[(backend, precision)] = measure_call(OP, "eval fwd", backend, device, precision, shape,
                                                             tf32(fn) if precision == "tf32" else fn, flop=flop)
            rows.append(row)
    fp32 = scores[("reference", "float32")]
    for (backend, precision), value in scores.items():
        diff = (value - fp32).abs().max().item() / max(fp32.abs().max().item(), 1e-12)
        print(f"eval scores {backend:10s} {precision:9s} max |diff| vs fp32 reference, relative: {diff:.2e}")
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n * lq, d, device=device).to(dtype)
        b = torch.randn(d, m, device=device).to(dtype)
        rows.append(measure(OP, "plain mm", "torch.mm", device, dtype, f"{n * lq}x{d}x{m}", lambda: a @ b,
                            flop=2.0 * n * lq * d * m))
    add_ratios(rows)
    for r in rows:  # pairs/s for the evaluation rows
        if r.case == "eval fwd":
            print(f"{r.backend:10s} {r.dtype:9s} {n_img * n_cap / (r.ms / 1e3):12.0f} pairs/s")
    return rows


if __name__ == "__main__":
    main(OP, run, __doc__)
