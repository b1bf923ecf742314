"""Two gloo processes on the CPU against one process at the same global batch: time per training step.

One step is what the trainer does: the model's loss on the global batch (hardest negatives
over all of it), backward, clip 2.0, Adam. One process takes the whole global batch with
every thread of the machine; under torch.distributed two processes (gloo, spawned here,
file rendezvous) take half of it each with half of the threads, gather the image encodings
and the score columns with gradient and all-reduce the gradients through DDP
(``sgfused.distributed``). Each rank times the same steps between barriers; the CSV has the
median step of the slowest rank, and, in ``shape``, the bytes each rank receives per step
from the gathers (image encodings, score columns) and the gradient bytes DDP all-reduces.
Cases: VSE++ and SGRAF (SGR) at the paper's dimensions (``--quick``: small ones, a smoke run).
Usage: python bench/bench_distributed.py [--quick]   (CPU only; results in bench/results/distributed_cpu*.csv)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, Row, train_step  # noqa: E402

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch  # noqa: E402
from sgfused.distributed import GlobalBatchLoss, World, shard_bounds  # noqa: E402
from sgfused.models import build_model  # noqa: E402

OP = "distributed"
WORLD = 2
VOCAB = 8481
TOKENS = (9, 15)  # caption lengths, <start> and <end> included
CASES = {  # name: (registry name, paper dimensions, quick dimensions)
    "VSE++": ("vsepp", dict(img_dim=2048, embed_size=1024, word_dim=300), dict(img_dim=48, embed_size=32, word_dim=16)),
    "SGRAF SGR": ("sgraf", dict(module="SGR", embed_size=1024, sim_dim=256, word_dim=300, img_dim=2048, num_regions=36),
                  dict(module="SGR", embed_size=32, sim_dim=16, word_dim=16, img_dim=48, num_regions=12)),
}


def global_batch(n: int, regions: int, img_dim: int) -> PairBatch:
    g = torch.Generator().manual_seed(1)
    features = torch.rand(n, regions, img_dim, generator=g)
    lens = torch.randint(TOKENS[0], TOKENS[1] + 1, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, int(lens.max())), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    index = torch.arange(n)
    return PairBatch(ImageBatch(features, index), CaptionBatch(ids, lens, index, index))


def shard(batch: PairBatch, world: World) -> PairBatch:
    return batch.rows(*shard_bounds(batch.images.index.numel(), world))


def model_for(case: str, quick: bool) -> torch.nn.Module:
    name, paper, small = CASES[case]
    torch.manual_seed(0)
    return build_model(name, VOCAB, small if quick else paper).train()


def traffic(model: torch.nn.Module, batch: PairBatch, world_size: int) -> str:
    """Bytes a rank receives per step from the gathers, and the gradient bytes DDP all-reduces."""
    with torch.no_grad():
        encoding = model.encode_images(shard(batch, World(0, world_size)).images)
    parts = encoding if isinstance(encoding, tuple) else (encoding,)
    n = batch.images.index.numel()
    per_rank = n // world_size
    images = sum(p.element_size() * p[0].numel() for p in parts) * (n - per_rank)
    columns = 4 * n * (n - per_rank)  # fp32 scores of the other ranks' columns
    grads = 4 * sum(p.numel() for p in model.parameters())
    return f"gathered {(images + columns) / 2**20:.2f} MiB, all-reduced {grads / 2**20:.1f} MiB"


def _worker(rank: int, rendezvous: str, out: str, case: str, quick: bool, n: int, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        world = World(rank, WORLD)
        model = model_for(case, quick)
        model.global_negatives = True
        ddp = torch.nn.parallel.DistributedDataParallel(GlobalBatchLoss(model, world), find_unused_parameters=True)
        regions = getattr(model, "num_regions", 36)
        batch = shard(global_batch(n, regions, CASES[case][2 if quick else 1]["img_dim"]), world)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            ddp(batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            optimizer.step()

        step()  # warm up
        seconds = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        torch.save(seconds, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def two_process_ms(case: str, quick: bool, n: int, steps: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        context = mp.get_context("spawn")
        workers = [context.Process(target=_worker, args=(r, os.path.join(out, "rendezvous"), out, case, quick, n, steps, threads))
                   for r in range(WORLD)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if any(w.exitcode != 0 for w in workers):
            raise RuntimeError(f"a worker failed: exit codes {[w.exitcode for w in workers]}")
        per_rank = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    return statistics.median(max(times) for times in zip(*per_rank)) * 1e3


def one_process_ms(model: torch.nn.Module, batch: PairBatch, steps: int) -> float:
    run = train_step(model, batch)
    run()  # warm up
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def run(quick: bool) -> list[Row]:
    threads = torch.get_num_threads()
    n, steps = (16, 2) if quick else (64, 5)
    rows = []
    for case in CASES:
        model = model_for(case, quick)
        regions = getattr(model, "num_regions", 36)
        batch = global_batch(n, regions, CASES[case][2 if quick else 1]["img_dim"])
        shape = f"global batch {n}; per step a rank: {traffic(model, batch, WORLD)}"
        one = one_process_ms(model, batch, steps)
        two = two_process_ms(case, quick, n, steps, max(1, threads // WORLD))
        for backend, ms, used in ((f"1 process x {threads} threads", one, threads),
                                  (f"{WORLD} processes x {max(1, threads // WORLD)} threads (gloo)", two, threads)):
            rows.append(Row(OP, f"{case} train step", backend, f"cpu ({used} threads)", "float32", shape, ms,
                            float("nan"), speedup_vs_reference=one / ms))
            print(f"{case:10s} {backend:34s} {ms:10.1f} ms/step  ({shape})", flush=True)
    return rows


def write_csv(rows: list[Row], quick: bool) -> str:
    """bench/results/distributed_cpu[_quick].csv (no plot: two rows per case, and no memory column to draw)."""
    path = os.path.join(RESULTS, f"{OP}_cpu{'_quick' if quick else ''}.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(vars(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in vars(row).items()})
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, two steps (smoke run)")
    args = parser.parse_args()
    print("wrote", write_csv(run(args.quick), args.quick))
