"""What the Triton kernels cost a Hopper GPU in registers and spills, and whether they use the tensor cores,
measured without a GPU.

Every Triton kernel that the ops launch at the benchmarks' feature sizes (d = 1024, m = 256,
SGRAF's Lq = 32 / Lc = 36, SGM's 36 x 12 and 26 x 4 nodes) is compiled for sm_90 through Triton's
own pipeline (scripts/triton_compile_only.py: what a GPU would launch, ``NATIVE_DOT`` included), in
fp32, fp32 with TF32 allowed, and bf16, forward and backward. For each kernel the cubin's resource
usage (``cuobjdump --dump-resource-usage``: registers per thread, stack bytes, which are spills)
and the matrix instructions of its PTX (``wgmma`` / ``mma``: tensor cores; none: CUDA-core FMAs)
go to ``bench/results/triton_sm90_resources.csv``. Only the batch counts are small (they do not
change what is compiled), so the launches also run in the interpreter quickly.

A kernel with a stack frame spills registers to local memory, which is what makes a kernel many
times slower than its arithmetic; a bf16 kernel without a matrix instruction gets no tensor cores.
``--check`` (run by CI) compiles the same kernels and compares them with the committed CSV instead
of writing it: it exits non-zero if a kernel spills more than the CSV says (a kernel it does not
list may not spill at all), a bf16 / TF32 ``tl.dot`` (a ``tt.dot`` in the kernel's Triton IR)
misses the tensor cores, a listed kernel is no longer compiled, or Triton is not the CSV's version.
So a change that makes a kernel spill fails CI, and one that changes the kernels regenerates the CSV.

    python bench/triton_sm90_resources.py [--check] [--op NAME] [--report CSV]

The GPU machines run an older Triton (3.6) than this environment: its report is
``bench/results/triton_sm90_resources_triton3.6.0.csv``, written and checked with that Triton
first on the path and ``--report`` naming it (``scripts/check_triton_compile.sh`` does the check
when it is given the version).

``--op`` compiles one op's kernels only and prints their rows without touching the CSV (for tuning
one kernel's block sizes).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPORT = os.path.join(RESULTS, "triton_sm90_resources.csv")
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "triton_compile_only.py")


def _load_plugin():
    """scripts/triton_compile_only.py, loaded from its file (before triton is imported: it sets TRITON_INTERPRET)."""
    spec = importlib.util.spec_from_file_location("triton_compile_only", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def resources(cubin: bytes) -> dict[str, int]:
    """REG and STACK of the (single-kernel) cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                             check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's output: {out[-300:]}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}


def matrix_instructions(ptx: str) -> str:
    """The kinds of the PTX's matrix instructions, e.g. "wgmma.f32.bf16.bf16", or "fma" when it has none."""
    kinds = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\.(f32\.\w+\.\w+)\b", ptx)))
    return " ".join(f"{op.split('.')[0]}.{types}" for op, types in kinds) or "fma"


def dot_count(ttir: str) -> int:
    """How many ``tl.dot`` the kernel kept after Triton's front end (``tt.dot`` ops of its IR)."""
    return len(re.findall(r"\btt\.dot\b", ttir))


def _cases():
    """(op, case, dtype name, TF32 allowed, a call running forward and backward) at the benchmarks' sizes."""
    import torch

    from sgfused.ops import (cross_attention, hardest_negative_loss, hardest_negative_loss_from_embeddings, max_sim,
                             pairwise_similarity)

    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    def pairs(mode):
        def call(dtype):
            x, y, w, b = leaf(16, 1024, dtype=dtype), leaf(16, 1024, dtype=dtype), leaf(256, 1024, dtype=dtype), leaf(256, dtype=dtype)
            pairwise_similarity(x, y, w * 0.03, b, mode, backend="triton").float().sum().backward()
        return call

    def attention(dtype):
        words, regions = leaf(2, 32, 1024, dtype=dtype), leaf(3, 36, 1024, dtype=dtype)
        weight, bias = leaf(256, 1024, dtype=dtype), leaf(256, dtype=dtype)
        out = cross_attention(words, regions, query_lens=[20, 9], epilogue="distance", weight=weight * 0.03,
                              bias=bias, backend="triton")
        out.float().sum().backward()

    def nodes(lx, ly):
        def call(dtype):
            x, y = leaf(3, lx, 1024, dtype=dtype), leaf(5, ly, 1024, dtype=dtype)
            max_sim(x * 0.03, y * 0.03, [lx, lx - 1, 1], [ly, 1, ly, 2, ly - 1], backend="triton").float().sum().backward()
        return call

    def scores(dtype):
        hardest_negative_loss(leaf(64, 64, dtype=dtype), backend="triton").backward()

    def embeddings(dtype):
        img, cap = leaf(64, 1024, dtype=dtype), leaf(64, 1024, dtype=dtype)
        hardest_negative_loss_from_embeddings(img * 0.03, cap * 0.03, backend="triton").backward()

    calls = [("pairwise_similarity", "distance, d=1024, m=256", pairs("distance")),
             ("pairwise_similarity", "direction, d=1024, m=256", pairs("direction")),
             ("cross_attention", "distance epilogue, Lq=32, Lc=36, d=1024, m=256", attention),
             ("max_sim", "objects 36 x 12, d=1024", nodes(36, 12)),
             ("max_sim", "relations 26 x 4, d=1024", nodes(26, 4)),
             ("hardest_negative_loss", "scores N=64", scores),
             ("hardest_negative_loss_from_embeddings", "d=1024", embeddings)]
    for op, case, call in calls:
        for dtype_name, dtype, tf32 in [("float32", torch.float32, False), ("tf32", torch.float32, True),
                                        ("bfloat16", torch.bfloat16, False)]:
            yield op, case, dtype_name, tf32, (lambda call=call, dtype=dtype: call(dtype))


def measure(only: str | None = None) -> list[dict]:
    """Compile every case's kernels (or those of op ``only``) for sm_90 and read their resources
    (one row per distinct kernel)."""
    plugin = _load_plugin()
    plugin.install(90)
    import torch
    import triton

    rows: dict[tuple, dict] = {}
    for op, case, dtype_name, tf32, call in _cases():
        if only is not None and op != only:
            continue

        def record(name, compiled, kwargs, op=op, case=case, dtype_name=dtype_name):
            constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
            key = (op, case, dtype_name, name, repr(sorted(constexprs.items(), key=str)))
            if key not in rows:
                rows[key] = dict(op=op, case=case, dtype=dtype_name, kernel=name,
                                 precision=constexprs.get("PRECISION", ""), num_warps=compiled.metadata.num_warps,
                                 **resources(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                                 dots=dot_count(compiled.asm["ttir"]), matrix=matrix_instructions(compiled.asm["ptx"]),
                                 triton=triton.__version__)
        plugin.on_compiled = record
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            call()
        finally:
            torch.set_float32_matmul_precision(saved)
        print(f"{op:38s} {case:48s} {dtype_name:9s} compiled", flush=True)
    return list(rows.values())


def problems(rows: list[dict]) -> list[str]:
    """Spilling kernels, and bf16 / TF32 kernels whose tl.dot runs on the CUDA cores."""
    found = []
    for r in rows:
        name = f"{r['op']} {r['case']} {r['dtype']}: {r['kernel']}"
        if r["stack_bytes"] > 0:
            found.append(f"{name} spills ({r['registers']} registers, {r['stack_bytes']} stack bytes)")
        if r["dtype"] in ("bfloat16", "tf32") and r["dots"] and r["matrix"] == "fma":
            found.append(f"{name} has a tl.dot but no tensor-core instruction")
    return found


def _keyed(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (op, case, dtype, kernel, n-th kernel of that name in the case): the compile order is fixed."""
    keyed, seen = {}, {}
    for r in rows:
        name = (r["op"], r["case"], r["dtype"], r["kernel"])
        seen[name] = seen.get(name, 0) + 1
        keyed[(*name, seen[name])] = r
    return keyed


def read_report(path: str = REPORT) -> list[dict]:
    """The committed report's rows, with its numbers as ints."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for r in rows:
        for field in ("num_warps", "registers", "stack_bytes", "shared_bytes", "dots"):
            r[field] = int(r[field])
    return rows


def regressions(rows: list[dict], committed: list[dict]) -> list[str]:
    """What the compiled ``rows`` do worse than the ``committed`` report (one line each)."""
    found = [line for line in problems(rows) if "tensor-core" in line]
    versions = {r["triton"] for r in committed} | {r["triton"] for r in rows}
    if len(versions) > 1:
        return found + [f"triton versions differ (compiled vs report: {sorted(versions)}): regenerate the report"]
    now, before = _keyed(rows), _keyed(committed)
    for key, r in now.items():
        allowed = before[key]["stack_bytes"] if key in before else 0
        if r["stack_bytes"] > allowed:
            found.append(f"{' '.join(map(str, key[:4]))}: {r['stack_bytes']} stack bytes, the report allows {allowed}")
    for key in before.keys() - now.keys():
        found.append(f"{' '.join(map(str, key[:4]))}: in the report, no longer compiled: regenerate the report")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed CSV instead of writing it; fail on any regression")
    parser.add_argument("--op", help="only this op's kernels, printed, the CSV left as it is")
    parser.add_argument("--report", default=REPORT,
                        help="the CSV to write or check (default: the report of the environment's Triton, "
                             "bench/results/triton_sm90_resources.csv)")
    args = parser.parse_args()
    rows = measure(args.op)
    if not rows:
        sys.exit(f"--op: no case of an op named {args.op!r}")
    if args.check:
        committed = [r for r in read_report(args.report) if args.op is None or r["op"] == args.op]
        found = regressions(rows, committed)
        for line in found:
            print("  " + line)
        print(f"{len(rows)} kernels against {os.path.relpath(args.report)}: {len(found)} regressions")
        sys.exit(1 if found else 0)
    if args.op is not None:
        for r in rows:
            print(f"  {r['case'][:40]:40s} {r['dtype']:9s} {r['kernel']:22s} warps {r['num_warps']} "
                  f"registers {r['registers']:3d} stack {r['stack_bytes']:5d} {r['matrix']}")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print("wrote", args.report)
    found = problems(rows)
    for line in found:
        print("  " + line)
    print(f"{len(rows)} kernels, {len(found)} problems")


if __name__ == "__main__":
    main()
