"""What the bf16 GEMMs buy on this CPU: the C++ kernels on bf16 inputs, GEMMs in bf16 and in fp32.

The C++ kernels run bf16 inputs' GEMMs in bf16 only where the CPU has bf16 dot instructions
(avx512_bf16 or AMX), and convert to fp32 elsewhere; ``SGFUSED_CPU_BF16_GEMM=1 / 0`` forces
either path. Each case times both paths on the same bf16 inputs (backends "cpu, bf16 GEMM" and
"cpu, fp32 GEMM"; the ratio columns are against the fp32 path), and the plain ``torch.mm`` rates
in fp32 and bf16 give the ceilings. Shapes are smaller slices of the op benchmarks' evaluation
shapes, so that the run takes about two minutes:

- ``max_sim``: SGM's object level, 200 images x 36 nodes vs 1000 captions x 12 nodes, d 1024;
- ``cross_attention``: SGRAF's evaluation, 50 images x 250 captions, Lq 32, Lc 36, d 1024, m 256;
- ``pairwise_similarity``: SGRAF's global nodes, 128 x 128 forward, d 1024, m 256.

Usage: python bench/bench_cpu_bf16.py [--quick]     (CPU only; writes bench/results/cpu_bf16_cpu.csv)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cross_attention  # noqa: E402
import bench_max_sim  # noqa: E402
import bench_pairwise_similarity  # noqa: E402
from harness import Row, add_ratios, main, measure  # noqa: E402

VARIABLE = "SGFUSED_CPU_BF16_GEMM"
PATHS = {"cpu, bf16 GEMM": "1", "cpu, fp32 GEMM": "0"}


def forced(fn, setting: str):
    """``fn`` run with the GEMM path forced (the kernels read the variable at every call)."""

    def run():
        before = os.environ.get(VARIABLE)
        os.environ[VARIABLE] = setting
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[VARIABLE]
            else:
                os.environ[VARIABLE] = before

    return run


def cases(quick: bool) -> list[tuple[str, str, object, float]]:
    """(op, shape, call on bf16 inputs with backend "cpu", useful FLOP of one call)."""
    d, m = (64, 32) if quick else (1024, 256)
    n_img, n_cap = (10, 50) if quick else (200, 1000)
    x, y, x_lens, y_lens = bench_max_sim.make(n_img, 36, n_cap, 12, True, d, torch.device("cpu"), torch.bfloat16)
    sim = bench_max_sim.op_call((x, y, x_lens, y_lens), "cpu", backward=False)
    out = [("max_sim", f"{n_img}x36 vs {n_cap}x12, d={d}", sim, bench_max_sim.useful_flop(x_lens, y_lens, d))]
    n_img, n_cap = (5, 25) if quick else (50, 250)
    tensors = bench_cross_attention.make(n_cap, n_img, 32, 36, d, m, torch.device("cpu"), torch.bfloat16)
    flop = n_img * n_cap * bench_cross_attention.flop_per_pair(tensors[2], 36, d, m)
    out.append(("cross_attention", f"{n_img}img x {n_cap}cap, d={d}, m={m}",
                bench_cross_attention.eval_scores(tensors, "cpu", 50), flop))
    n = 16 if quick else 128
    tensors = bench_pairwise_similarity.inputs(n, n, d, m, torch.device("cpu"), torch.bfloat16)
    out.append(("pairwise_similarity", f"{n}x{n}, d={d}, m={m}",
                bench_pairwise_similarity.call(tensors, "cpu", backward=False), 2.0 * n * n * d * m))
    return out


def run(device: torch.device, quick: bool) -> list[Row]:
    if device.type != "cpu":
        raise SystemExit("bench_cpu_bf16.py: --device must be cpu (it times the CPU kernels' GEMM paths)")
    rows = []
    for op, shape, fn, flop in cases(quick):
        for backend, setting in PATHS.items():
            rows.append(measure(op, "bf16 forward", backend, device, torch.bfloat16, shape, forced(fn, setting),
                                flop=flop))
    n = 512 if quick else 4096
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, 1024).to(dtype), torch.randn(1024, n).to(dtype)
        rows.append(measure("torch.mm", "plain mm", "torch.mm", device, dtype, f"{n}x1024 @ 1024x{n}", lambda: a @ b,
                            flop=2.0 * n * n * 1024))
    add_ratios(rows, baseline="cpu, fp32 GEMM")
    return rows


if __name__ == "__main__":
    main("cpu_bf16", run, __doc__)
