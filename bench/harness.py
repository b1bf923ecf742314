"""Shared benchmark harness: time, peak memory, CSV rows and one plot per op.

Timing: torch.utils.benchmark (median of blocked runs) on the CPU,
triton.testing.do_bench (median) on a GPU, or for calls over 200 ms the median
of three calls between CUDA events (do_bench would repeat them for minutes), and for
calls over 2 s one call after the warm-up (a GPU lease is minutes long; the spread of
such a call is far under the differences measured). Peak memory: on a GPU the CUDA
allocator's peak during the first timed call; on the CPU the running sum of the allocations ATen reports to
the profiler while the function runs (the kernels' small O(N) std::vector
bookkeeping is not seen by it). Either way it is the memory *added* by the call:
inputs exist before it starts. :func:`measure_call` also returns the warm-up call's
output, so a bench checks its numbers without one more call. Rows go to
``bench/results/<op>_<device>.csv`` with the ratio of every backend to the reference
measured in the same run; TF32 rows (:func:`tf32`, GPU only) carry the dtype "tf32".
A bench stopped by SIGTERM (``timeout`` in bench/gpu_check.sh) still writes the rows it had
measured, with their ratios, before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from sgfused._backend import cpu_bf16_dot, measured_choices

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's thread count and whether it has bf16 dot instructions: bf16 runs
    several times faster than fp32 with them and about 100x slower without, so CPU rows name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {cpu_bf16_dot() or 'no bf16 dot'})"


def fused_label(device: torch.device) -> str:
    """The backend name of a model's rows on its fused kernels: "auto" on a GPU, where auto's measure rule
    picks CUDA C++ or Triton per call, and "cpu" on the CPU, where the C++ kernels are auto's only pick."""
    return "auto" if device.type == "cuda" else "cpu"


def commit() -> str:
    """The commit measured: ``SGFUSED_COMMIT`` where set (a device machine's copy of the tree has no git), else git's."""
    if os.environ.get("SGFUSED_COMMIT"):
        return os.environ["SGFUSED_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


LONG_MS = 200.0  # GPU calls at least this long are timed between events, not by do_bench
ONE_CALL_MS = 2_000.0  # GPU calls at least this long are timed once after the warm-up


def time_and_peak(fn: Callable[[], object], device: torch.device, min_run_time: float = 1.0) -> tuple[float, int, object]:
    """Median milliseconds per call, peak bytes added by a call, and the warm-up call's output."""
    if device.type == "cuda":
        return _cuda_time_and_peak(fn, device)
    from torch.utils.benchmark import Timer

    output = fn()  # warm up (first-call allocations, lazy imports)
    first = _seconds(fn)
    if first > min_run_time:
        # long calls (training steps): the median of five, since one call's time swings with the
        # allocator's page faults (SGRAF's reference training step: 8.9 to 10.4 s in one process);
        # the median of three for calls over 20 s (full-size reference evaluations), where that swing is small
        more = 2 if first > 20.0 else 4
        ms = statistics.median([first] + [_seconds(fn) for _ in range(more)]) * 1e3
    else:
        # Timer runs on one thread unless told otherwise: time with every thread the process has
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        ms = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return ms, cpu_peak_bytes(fn), output


def _cuda_time_and_peak(fn: Callable[[], object], device: torch.device) -> tuple[float, int, object]:
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def event_ms() -> float:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    output = fn()  # warm up (compilation, autotuning, allocator)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    first = event_ms()
    peak = torch.cuda.max_memory_allocated(device) - base
    if first < LONG_MS:
        ms = float(triton.testing.do_bench(fn, return_mode="median"))
    elif first < ONE_CALL_MS:
        ms = float(statistics.median([first, event_ms(), event_ms()]))
    else:
        ms = first
    return ms, peak, output


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call beyond what was allocated before it (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def tf32_matmul() -> Iterator[None]:
    """fp32 matrix products as TF32 on the tensor cores inside the block (as ``set_float32_matmul_precision("high")``)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def tf32(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under :func:`tf32_matmul`: the reference's torch.matmul and the kernels' products alike."""

    def run() -> object:
        with tf32_matmul():
            return fn()

    return run


@dataclass
class Row:
    op: str
    case: str
    backend: str
    device: str
    dtype: str
    shape: str
    ms: float
    peak_mib: float
    gflop_per_s: float = float("nan")
    speedup_vs_reference: float = float("nan")
    memory_vs_reference: float = float("nan")
    commit: str = field(default_factory=commit)


FLOAT_FIELDS = {"ms", "peak_mib", "gflop_per_s", "speedup_vs_reference", "memory_vs_reference"}
MEASURED_ROWS: list[Row] = []  # every row this process measured, in order: what a stopped bench writes


def measure_call(
    op: str, case: str, backend: str, device: torch.device, dtype: torch.dtype | str, shape: str, fn, flop: float = 0.0
) -> tuple[Row, object]:
    """Time and peak memory of ``fn`` and its output; ``flop`` (the useful operations of one call) adds GFLOP/s.

    ``dtype`` is the inputs' dtype, or "tf32" for fp32 inputs timed under :func:`tf32`.
    """
    ms, peak, output = time_and_peak(fn, device)
    peak /= 2**20
    rate = flop / ms / 1e6 if flop else float("nan")
    label = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    row = Row(op, case, backend, device_name(device), label, shape, ms, peak, rate)
    MEASURED_ROWS.append(row)
    print(f"{op:20s} {case:26s} {backend:10s} {label:9s} {shape:24s} {ms:10.3f} ms {peak:10.1f} MiB {rate:8.1f} GFLOP/s",
          flush=True)
    return row, output


def measure(
    op: str, case: str, backend: str, device: torch.device, dtype: torch.dtype | str, shape: str, fn, flop: float = 0.0
) -> Row:
    """:func:`measure_call` without the output."""
    return measure_call(op, case, backend, device, dtype, shape, fn, flop)[0]


def train_step(model: torch.nn.Module, batch) -> Callable[[], torch.Tensor]:
    """One training step of a retrieval model as a timed call: ``model.loss(batch)``, backward, clip 2.0, Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        return loss

    return run


def add_ratios(rows: list[Row], baseline: str = "reference") -> None:
    """Fill each row's speedup and memory ratio against the baseline row of the same case and shape."""
    base = {(r.case, r.shape, r.dtype): r for r in rows if r.backend == baseline}
    for r in rows:
        ref = base.get((r.case, r.shape, r.dtype))
        if ref is not None:
            r.speedup_vs_reference = ref.ms / r.ms
            r.memory_vs_reference = r.peak_mib / ref.peak_mib if ref.peak_mib > 0 else float("nan")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write(op: str, rows: list[Row], device: torch.device, quick: bool = False) -> str:
    """Write rows to bench/results/<op>_<device>[_quick].csv and draw the plot next to it; returns the CSV path.

    Quick (smoke) runs get their own files, so they never replace a full run's results.
    """
    os.makedirs(RESULTS, exist_ok=True)
    tag = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    path = os.path.join(RESULTS, f"{op}_{tag}{'_quick' if quick else ''}.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    plot(path, rows, f"{op} on {rows[0].device}")
    return path


def read(path: str) -> list[Row]:
    """Rows back from a CSV written by :func:`write` (to redraw a plot without re-measuring)."""
    with open(path, newline="") as handle:
        return [
            Row(**{k: (float(v) if k in FLOAT_FIELDS else v) for k, v in record.items()})
            for record in csv.DictReader(handle)
        ]


COLORS = {"reference": "C0", "cpu": "C1", "cuda": "C2", "triton": "C3", "vsepp": "C4", "torch.mm": "C5"}


def plot(csv_path: str, rows: list[Row], title: str) -> None:
    """One PNG per op: time and peak memory per case and backend, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    cases = sorted({(r.case, r.dtype) for r in rows})
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for line, (case, dtype) in zip(axes, cases):
        subset = [r for r in rows if (r.case, r.dtype) == (case, dtype)]
        shapes = list(dict.fromkeys(r.shape for r in subset))
        for backend in dict.fromkeys(r.backend for r in subset):
            points = {r.shape: r for r in subset if r.backend == backend}
            xs = [i for i, s in enumerate(shapes) if s in points]
            color = COLORS.get(backend)
            line[0].plot(xs, [points[shapes[i]].ms for i in xs], marker="o", label=backend, color=color)
            line[1].plot(xs, [max(points[shapes[i]].peak_mib, 1e-3) for i in xs], marker="o", label=backend, color=color)
        for ax, label in zip(line, ("ms (median)", "extra peak MiB")):
            ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{case} ({dtype})", fontsize=9)
            ax.grid(alpha=0.3)
        line[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(csv_path.replace(".csv", ".png"), dpi=110)
    plt.close(fig)


def write_measured_and_exit(op: str, device: torch.device, quick: bool, signum: int) -> None:
    """On SIGTERM: write the rows measured so far (ratios against the reference rows among them), then exit."""
    rows = list(MEASURED_ROWS)
    if rows:
        add_ratios(rows)
        print(f"stopped: wrote the {len(rows)} rows measured so far to {write(op, rows, device, quick)}", flush=True)
    sys.exit(128 + signum)


def main(op: str, run: Callable[[torch.device, bool], list[Row]], doc: str | None) -> None:
    """Command line shared by the bench scripts: --device, --quick; runs, then writes CSV and plot."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    signal.signal(signal.SIGTERM, lambda signum, frame: write_measured_and_exit(op, device, args.quick, signum))
    print("wrote", write(op, run(device, args.quick), device, args.quick))
    for kind, (backend, seconds) in measured_choices().items():  # what the "auto" rows ran (bench_gpu.log keeps it)
        timed = ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in seconds.items())
        print(f"auto chose {backend} ({timed}) for {kind}")


if __name__ == "__main__":
    import sys

    for csv_path in sys.argv[1:]:  # redraw plots from CSVs: python bench/harness.py bench/results/*.csv
        measured = read(csv_path)
        plot(csv_path, measured, f"{measured[0].op} on {measured[0].device}")
