"""The plain ``torch.mm`` rate of this machine in fp32 and bf16: the ceiling the CPU kernels are compared with.

For each shape (the max_sim kernel's 256 x 1024 x 256 block up to 2048 x 1024 x 2048) it
prints GFLOP/s (median call over at least 3 s or 3 calls) and the largest difference of
the bf16 product from the fp32 one, so that a fast but wrong path would show. Results of
the last run: ``bench/results/matmul_rate_cpu.log``.
Usage: python bench/matmul_rate.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(256, 1024, 256), (512, 1024, 512), (1024, 1024, 1024), (2048, 1024, 2048), (4096, 1024, 256)]


def median_seconds(fn) -> tuple[float, int]:
    """Median seconds per call and the number of calls (one call when a call exceeds 20 s)."""
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < 3.0 or len(times) < 3:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
        if times[-1] > 20:
            break
    return sorted(times)[len(times) // 2], len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        exact = a @ b
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            error = ((x @ y).float() - exact).abs().max().item()  # also the warm-up call
            seconds, calls = median_seconds(lambda: x @ y)
            print(f"{m}x{k} @ {k}x{n} {str(dtype):15s} {2 * m * k * n / seconds / 1e9:8.1f} GFLOP/s  "
                  f"({seconds * 1e3:.2f} ms, {calls} calls, max err vs fp32 {error:.3g})", flush=True)


if __name__ == "__main__":
    main()
