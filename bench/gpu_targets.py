"""The GPU speed targets against the figures in one GPU's benchmark CSVs: one line per target.

Reads ``bench/results/<op>_<gpu>.csv`` as the bench scripts write them (``<gpu>``: the
local GPU's name, or ``--gpu`` to read a committed run, e.g. ``nvidia_h100_80gb_hbm3``) and
prints, for every target of the tensor-core work, the measured figure and whether it is met;
"not measured" where the CSV or the row is missing. Ratios are the CSVs' own, against the
reference (or the published loop) measured in the same run. ``bench/gpu_check.sh`` prints
this last, so that a GPU lease's reply ends with it.
Usage: python bench/gpu_targets.py [--gpu NAME] [--results DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, Row, read, slug  # noqa: E402

Rows = dict[str, list[Row]]  # op -> rows


def load(results: str, gpu: str) -> Rows:
    """Every op's rows for this GPU (ops without a CSV are absent)."""
    suffix = f"_{gpu}.csv"
    return {name[: -len(suffix)]: read(os.path.join(results, name)) for name in sorted(os.listdir(results))
            if name.endswith(suffix)}


def pick(rows: Rows, op: str, case: str | tuple[str, ...], backends: tuple[str, ...], dtypes: tuple[str, ...]) -> list[Row]:
    """The rows of ``op`` for the case (or any of the cases), backends and dtypes given."""
    cases = (case,) if isinstance(case, str) else case
    return [r for r in rows.get(op, []) if r.case in cases and r.backend in backends and r.dtype in dtypes]


def fastest(found: list[Row]) -> Row | None:
    return min(found, key=lambda r: r.ms, default=None)


def seconds_under(limit_s: float, op: str, case: str, dtypes: tuple[str, ...]) -> Callable[[Rows], tuple[str, bool | None]]:
    """The fastest GPU backend's time for ``case`` in ``dtypes``, against ``limit_s``."""

    def check(rows: Rows) -> tuple[str, bool | None]:
        best = fastest(pick(rows, op, case, ("cuda", "triton", "auto"), dtypes))
        if best is None:
            return "not measured", None
        return f"{best.ms / 1e3:.3f} s ({best.backend}, {best.dtype}, {best.shape})", best.ms / 1e3 < limit_s

    return check


def ratio_at_least(speedup: float, op: str, case: str | tuple[str, ...], shape: str | None = None, memory: float | None = None,
                   backends: tuple[str, ...] = ("cuda", "triton", "fused", "auto"),
                   dtypes: tuple[str, ...] = ("float32", "tf32")) -> Callable[[Rows], tuple[str, bool | None]]:
    """The best backend's speed-up for ``case`` (and its memory ratio), against the target."""

    def check(rows: Rows) -> tuple[str, bool | None]:
        found = [r for r in pick(rows, op, case, backends, dtypes) if shape is None or r.shape == shape]
        if not found:
            return "not measured", None
        met = [r for r in found if r.speedup_vs_reference >= speedup
               and (memory is None or r.memory_vs_reference <= memory)]
        best = max(met or found, key=lambda r: r.speedup_vs_reference)
        text = f"{best.speedup_vs_reference:.2f}x"
        if memory is not None:
            text += f", memory {best.memory_vs_reference:.3f}x"
        return f"{text} ({best.backend}, {best.dtype})", bool(met)

    return check


def loop_time(rows: Rows) -> tuple[str, bool | None]:
    """The published per-caption loop's time, reported (no target)."""
    found = pick(rows, "sgraf", "eval SGR similarity", ("loop",), ("float32",))
    return (f"{found[0].ms / 1e3:.2f} s ({found[0].shape})", None) if found else ("not measured", None)


def triton_backwards(rows: Rows) -> tuple[str, bool | None]:
    """The slowest Triton backward (a case with "bwd" in its name) against its reference."""
    found = [r for op_rows in rows.values() for r in op_rows
             if r.backend == "triton" and "bwd" in r.case and r.speedup_vs_reference == r.speedup_vs_reference]
    if not found:
        return "not measured", None
    worst = min(found, key=lambda r: r.speedup_vs_reference)
    return (f"slowest {worst.speedup_vs_reference:.2f}x ({worst.op}, {worst.case}, {worst.dtype}, {worst.shape}); "
            f"{len(found)} rows"), worst.speedup_vs_reference >= 1.0


def _calls_with_both_kernels(rows: Rows) -> dict[tuple[str, str, str, str], dict[str, Row]]:
    """Every benchmarked call (op, case, dtype, shape) that timed the CUDA and the Triton kernel: backend -> row."""
    calls: dict[tuple[str, str, str, str], dict[str, Row]] = {}
    for op_rows in rows.values():
        for r in op_rows:
            calls.setdefault((r.op, r.case, r.dtype, r.shape), {})[r.backend] = r
    return {call: found for call, found in calls.items() if "cuda" in found and "triton" in found}


def auto_picks(rows: Rows) -> tuple[str, bool | None]:
    """Whether ``backend="auto"``'s order rule (CUDA C++ where the op has one, before Triton) picks the
    fastest backend in every benchmarked call that timed both kernels: Triton within 5% of CUDA or
    slower, and the reference (which auto never takes, since it holds more memory) slower."""
    both = _calls_with_both_kernels(rows)
    if not both:
        return "not measured", None
    slower = [(found["cuda"].ms / found["triton"].ms, call) for call, found in both.items()
              if found["cuda"].ms > 1.05 * found["triton"].ms]
    beaten = sum(1 for found in both.values() if "reference" in found and found["reference"].ms < found["cuda"].ms)
    text = f"CUDA slower than Triton in {len(slower)} of {len(both)} calls; the reference faster in {beaten}"
    if slower:
        worst, (op, case, dtype, shape) = max(slower)
        text += f" (worst {worst:.2f}x: {op}, {case}, {dtype}, {shape})"
    return text, not slower and not beaten


def auto_measures(rows: Rows) -> tuple[str, bool | None]:
    """Whether ``backend="auto"`` under its measure rule (the default; its own "auto" rows, the timing
    in their warm-up) ran within 5% of the faster kernel in every benchmarked call that timed both.
    The reference's wins are counted but not held against it: auto never takes the reference."""
    timed = {call: found for call, found in _calls_with_both_kernels(rows).items() if "auto" in found}
    if not timed:
        return "not measured", None
    late = []
    for (op, case, dtype, shape), found in timed.items():
        faster = min(found["cuda"].ms, found["triton"].ms)
        if found["auto"].ms > 1.05 * faster:
            late.append((found["auto"].ms / faster, op, case, dtype, shape))
    beaten = sum(1 for found in timed.values()
                 if "reference" in found and found["reference"].ms < min(found["cuda"].ms, found["triton"].ms))
    text = f"slower than the faster kernel by over 5% in {len(late)} of {len(timed)} calls"
    if late:
        worst, op, case, dtype, shape = max(late)
        text += f" (worst {worst:.2f}x: {op}, {case}, {dtype}, {shape})"
    return f"{text}; the reference faster than both in {beaten}", not late


TARGETS: list[tuple[str, Callable[[Rows], tuple[str, bool | None]]]] = [
    ("SGRAF SGR 1000 x 5000, bf16 < 1 s", seconds_under(1.0, "sgraf", "eval SGR similarity", ("bfloat16",))),
    ("SGRAF SGR 1000 x 5000, fp32 / TF32 < 2 s", seconds_under(2.0, "sgraf", "eval SGR similarity", ("float32", "tf32"))),
    ("SGRAF SGR 1000 x 5000, the published loop", loop_time),
    ("cross_attention eval 1000 x 5000, bf16 < 0.3 s", seconds_under(0.3, "cross_attention", "eval fwd", ("bfloat16",))),
    ("cross_attention train 128 x 128 >= 4x, <= 1/8 memory",
     ratio_at_least(4.0, "cross_attention", "train fwd+bwd fp32", memory=1 / 8)),
    ("pairwise_similarity 128 x 128 fwd+bwd >= 2x",
     ratio_at_least(2.0, "pairwise_similarity", ("train fwd+bwd float32", "train fwd+bwd tf32"))),
    ("hardest_negative embeddings N = 16384 >= 1x, <= 1/30 memory",
     ratio_at_least(1.0, "hardest_negative_loss", "embeddings fwd+bwd", shape="N=16384,d=1024", memory=1 / 30)),
    ("SGRAF training step >= 2x", ratio_at_least(2.0, "sgraf", "train SGR Adam step")),
    ("MPSM training step >= 2x", ratio_at_least(2.0, "mpsm", "train distance Adam step")),
    ("SGFN training step >= 2x", ratio_at_least(2.0, "sgfn", "train step full")),
    ("SGM training step >= 2x", ratio_at_least(2.0, "sgm", "train step")),
    ("every Triton backward >= 1x the reference", triton_backwards),
    ("backend=\"auto\", order rule (CUDA, else Triton) picks the fastest", auto_picks),
    ("backend=\"auto\", measure rule (default) as fast as the faster kernel", auto_measures),
]


def report(rows: Rows) -> list[str]:
    """One line per target: the target, the figure, met / NOT MET / '-' (nothing to meet or not measured)."""
    lines = []
    for target, check in TARGETS:
        figure, met = check(rows)
        lines.append(f"{target:60s} {figure:60s} {'-' if met is None else ('met' if met else 'NOT MET')}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", help="the GPU part of the CSV names (default: the local GPU's)")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    if args.gpu is None:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu: no local GPU; name the run to read, e.g. --gpu nvidia_h100_80gb_hbm3")
        args.gpu = slug(torch.cuda.get_device_name())
    rows = load(args.results, args.gpu)
    if not rows:
        parser.error(f"--gpu: no {args.results}/*_{args.gpu}.csv")
    print(f"GPU targets, {args.gpu} ({', '.join(sorted(rows))}):")
    print("\n".join(report(rows)))


if __name__ == "__main__":
    main()
