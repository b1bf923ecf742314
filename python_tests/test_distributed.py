"""Two gloo processes on the CPU against one process on the concatenated batch (issue 18).

Each test spawns two workers (torch.multiprocessing, file rendezvous, one thread each,
bounded by ``TIMEOUT``), which write what they computed to files the test compares
with the same computation done here in one process: a training step's loss and every
gradient (max violation; fp64 for VSE++ and SGRAF SGR, fp32 for SAF, a repeated image across the
ranks), the weights after a few training steps, sharded evaluation, and an
interrupted-and-resumed 2-process run against an uninterrupted one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

import numpy as np

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import assert_gradients_close
from sgfused.checkpoint import CheckpointError
from sgfused.cli import main
from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch
from sgfused.data.precomp import PrecompSplit
from sgfused.data.synthetic import generate
from sgfused.data.vocab import Vocabulary
from sgfused.distributed import GlobalBatchLoss, World, rank_order, shard_bounds
from sgfused.evaluate import evaluate_model
from sgfused.models import build_model
from sgfused.train import TrainConfig, Trainer

WORLD = 2
TIMEOUT = 120  # seconds for both workers together (they take a few seconds each on a quiet machine)
VOCAB = 30
REGIONS = 36  # the synthetic scenes' region count
SMALL = {
    "vsepp": dict(img_dim=12, embed_size=10, word_dim=6),
    "SGR": dict(module="SGR", embed_size=8, sim_dim=6, word_dim=6, img_dim=12, num_regions=5, sgr_step=2),
    "SAF": dict(module="SAF", embed_size=8, sim_dim=6, word_dim=6, img_dim=12, num_regions=5),
}
FEATURE_DIM = 12
# fp64 where the model computes in it; SAF's gates run in fp32 whatever the input (sgfused.models.sgraf)
DTYPES = {"vsepp": torch.float64, "SGR": torch.float64, "SAF": torch.float32}
TIGHT = {torch.float64: 1e-10, torch.float32: 1e-4}


# ----------------------------------------------------------------------------- running two workers


def _worker(rank: int, rendezvous: str, out_dir: str, job: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
        try:
            torch.save(JOBS[job](rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()  # neither rank tears the group down while the other is in a collective
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_two(tmp_path, job: str, *args) -> list:
    """Runs ``JOBS[job](rank, *args)`` in two gloo processes; returns what each returned."""
    out = tmp_path / f"{job}-results"
    out.mkdir()
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker, args=(rank, str(tmp_path / f"{job}-rendezvous"), str(out), job, args))
               for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + TIMEOUT
    # a worker that failed leaves the other one waiting in a collective: stop waiting at the first failure
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        if any(w.exitcode not in (None, 0) for w in workers):
            break
        time.sleep(0.05)
    hung = [w for w in workers if w.is_alive()]
    for worker in hung:
        worker.kill()
        worker.join()
    errors = [(out / f"rank{r}.error").read_text() for r in range(WORLD) if (out / f"rank{r}.error").exists()]
    assert not errors, "\n".join(errors)
    assert not hung, f"{len(hung)} workers still running after {TIMEOUT} s (or after the other failed)"
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ----------------------------------------------------------------------------- a step's loss and gradients


# image ids of the global batch: image 3 is in both shards (two of its captions), so a
# positive pair spans the ranks; the shards' captions differ in length
IMAGE_IDS = [0, 3, 1, 2, 4, 5, 3, 6]
LENGTHS = [4, 7, 3, 5, 6, 2, 5, 3]


def _build(name: str, vocab_size: int, regions: int | None = None, dropout: bool = False) -> nn.Module:
    """A small VSE++ or SGRAF (SGR / SAF) model; without dropout unless asked (its masks are per process)."""
    config = SMALL[name] if regions is None else {**SMALL[name], "num_regions": regions}
    model = build_model("vsepp" if name == "vsepp" else "sgraf", vocab_size, config)
    if not dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = _build(name, VOCAB).to(DTYPES[name])
    model.margin, model.max_violation = 0.2, True
    return model.train()


def _global_batch(name: str) -> PairBatch:
    g = torch.Generator().manual_seed(5)
    regions = SMALL[name].get("num_regions", 4)
    per_image = torch.randn(max(IMAGE_IDS) + 1, regions, FEATURE_DIM, generator=g, dtype=DTYPES[name])
    ids = torch.tensor(IMAGE_IDS)
    lengths = torch.tensor(LENGTHS)
    tokens = torch.randint(4, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    tokens[torch.arange(tokens.shape[1]) >= lengths[:, None]] = 0
    return PairBatch(ImageBatch(per_image[ids], ids), CaptionBatch(tokens, lengths, torch.arange(len(ids)), ids))


def _step_job(rank: int, name: str, raw_images: bool) -> dict:
    model = _model(name)
    world = World(rank, WORLD)
    model.global_negatives = True
    model.image_batch_statistics = raw_images  # True: the image batches are gathered, every rank encodes all
    ddp = nn.parallel.DistributedDataParallel(GlobalBatchLoss(model, world), find_unused_parameters=True)
    batch = _global_batch(name)
    share = ddp(batch.rows(*shard_bounds(len(IMAGE_IDS), world)))
    share.backward()
    total = share.detach() / WORLD
    dist.all_reduce(total)
    return {"loss": total, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": dict(model.named_buffers())}


@pytest.mark.parametrize("name, raw_images", [("vsepp", False), ("SGR", False), ("SAF", False), ("SGR", True)])
def test_two_process_step_equals_one_process_step(tmp_path, name, raw_images):
    model = _model(name)
    loss = model.loss(_global_batch(name))
    loss.backward()
    assert loss.item() > 0.5  # violated hinges: the gradients below are not trivially zero
    tol = TIGHT[DTYPES[name]]
    for result in run_two(tmp_path, "step", name, raw_images):
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=tol, atol=0.0)
        assert_gradients_close(result["grads"], {n: p.grad for n, p in model.named_parameters()}, tol)
        for n, b in model.named_buffers():  # BatchNorm statistics, SAF's per-caption ones included
            torch.testing.assert_close(result["buffers"][n], b, rtol=tol, atol=tol, msg=n)


# ----------------------------------------------------------------------------- training, evaluation, resume


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, 45, seed=3, feature_dim=FEATURE_DIM, progress=False)
    return root


def _splits(root):
    vocab = Vocabulary.load(root / "vocab.json")
    return vocab, PrecompSplit(root, "train", vocab), PrecompSplit(root, "dev", vocab)


def _trainer(root, out, name: str, batch_size: int, init_seed: int = 0, dropout: bool = False, **options) -> Trainer:
    vocab, train, dev = _splits(root)
    torch.manual_seed(init_seed)
    model = _build(name, len(vocab), None if name == "vsepp" else REGIONS, dropout)
    config = TrainConfig(**{"epochs": 1, "batch_size": batch_size, "lr": 2e-3, "lr_decay_epochs": 1, **options})
    return Trainer(model, train, dev, vocab, config, out, progress=False, verbose=False)


# A bias feeding a training-mode BatchNorm or a softmax has gradient 0 in exact arithmetic: what it
# gets is rounding noise, which Adam scales up to lr-sized steps, so it (and the BatchNorm's running
# mean) follows the noise of whichever process computes it. Its gradient is compared in the step test.
NOISE_DRIVEN = {
    f"sim_encoder.{name}" for name in (
        "v_global_w.embedding_local.0.bias", "v_global_w.embedding_local.1.running_mean",
        "v_global_w.embedding_global.0.bias", "v_global_w.embedding_global.1.running_mean",
        "v_global_w.embedding_common.0.bias", "t_global_w.embedding_common.0.bias",
        "SAF_module.attn_sim_w.bias", "SAF_module.bn.running_mean",
    )
}


def _train_job(rank: int, root, out, name: str) -> dict:
    trainer = _trainer(root, out, name, batch_size=8)
    trainer.fit()
    return {"state": trainer.model.state_dict(), "steps": trainer.step}


@pytest.mark.parametrize("name", ["vsepp", "SAF"])
def test_two_process_training_gives_the_weights_of_one_process(dataset, tmp_path, name):
    # 36 train images x 5 captions = 180 pairs: 11 global batches of 16, the last one of 4 (2 per rank)
    one = _trainer(dataset, tmp_path / "one", name, batch_size=16)
    one.fit()
    results = run_two(tmp_path, "train", dataset, tmp_path / "two", name)
    assert results[0]["steps"] == results[1]["steps"] == one.step == 12
    for result in results:
        for n, want in one.model.state_dict().items():
            if n not in NOISE_DRIVEN:
                torch.testing.assert_close(result["state"][n], want, rtol=1e-4, atol=2e-5, msg=n)
    log_one, log_two = ((tmp_path / run / "log.csv").read_text().splitlines() for run in ("one", "two"))
    assert len(log_two) == len(log_one)  # rank 0 alone writes the log


def _test_split_similarity(root, shard_rows: bool) -> torch.Tensor:
    vocab = Vocabulary.load(root / "vocab.json")
    torch.manual_seed(1)
    model = _build("SAF", len(vocab), REGIONS)
    return evaluate_model(model, PrecompSplit(root, "test", vocab), batch_size=3, progress=False, shard_rows=shard_rows)[1]


def _eval_job(rank: int, root) -> torch.Tensor:
    return _test_split_similarity(root, shard_rows=True)


def test_sharded_evaluation_equals_one_process(dataset, tmp_path):
    want = _test_split_similarity(dataset, shard_rows=False)
    assert want.shape[0] % WORLD  # uneven blocks of rows
    for sims in run_two(tmp_path, "eval", dataset):
        torch.testing.assert_close(sims, want, rtol=1e-6, atol=1e-6)


def _resume_job(rank: int, root, tmp) -> dict:
    options = dict(name="SGR", batch_size=8, dropout=True, checkpoint_every=4, epochs=2)
    uninterrupted = _trainer(root, tmp / "a", **options)
    uninterrupted.fit()
    stopped = _trainer(root, tmp / "b", **options).fit(stop_after_steps=10)  # last.pt of step 8 on disk
    resumed = _trainer(root, tmp / "b", init_seed=7, **options)
    summary = resumed.fit()
    return {"stopped": stopped, "summary": summary, "want": uninterrupted.model.state_dict(),
            "got": resumed.model.state_dict()}


def test_two_process_resume_is_exact_and_another_world_size_is_refused(dataset, tmp_path):
    for result in run_two(tmp_path, "resume", dataset, tmp_path):
        assert result["stopped"]["steps"] == 10 and not result["stopped"]["finished"]
        assert result["summary"]["finished"] and result["summary"]["steps"] == 24
        for n, want in result["want"].items():
            assert torch.equal(result["got"][n], want), n
    one = _trainer(dataset, tmp_path / "b", name="SGR", batch_size=8, dropout=True, checkpoint_every=4, epochs=3)
    with pytest.raises(CheckpointError, match="trained by 2 processes, this run has 1"):
        one.fit()


def test_torchrun_runs_the_train_and_eval_commands(dataset, tmp_path, capsys):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m", "sgfused"]
    model = ["--set", "img_dim=12", "embed_size=10", "word_dim=6"]
    train = subprocess.run(
        torchrun + ["train", "--model", "vsepp", "--data", str(dataset), "--out", str(tmp_path / "run"), "--epochs", "1",
                    "--batch-size", "8", "--device", "cpu", "--quiet", *model],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,  # not the source tree: the installed package
    )
    assert train.returncode == 0, train.stderr
    assert train.stdout.count("starting: epoch 1/1") == 1  # rank 0 alone speaks
    assert "global batch 16 (8 per process x 2 processes)" in train.stdout
    evaluate = ["eval", str(tmp_path / "run" / "best.pt"), "--data", str(dataset), "--device", "cpu", "--quiet"]
    sharded = subprocess.run(torchrun + evaluate + ["--save-sims", str(tmp_path / "two")],
                             capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr
    capsys.readouterr()
    assert main(evaluate + ["--save-sims", str(tmp_path / "one")]) == 0
    assert sharded.stdout == capsys.readouterr().out.replace(str(tmp_path / "one"), str(tmp_path / "two"))  # rank 0's report
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), rtol=1e-6, atol=1e-6)


JOBS = {"step": _step_job, "train": _train_job, "eval": _eval_job, "resume": _resume_job}


# ----------------------------------------------------------------------------- shards


def test_shards_of_every_global_batch_concatenate_to_it():
    order = list(range(100, 123))  # 23 items: two global batches of 3 x 4, the last one of 11
    shards = [rank_order(order, 4, World(rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [8, 8, 7]
    rebuilt = []
    for step in range(2):
        for shard in shards:
            rebuilt.extend(shard[4 * step : 4 * step + 4])
    assert rebuilt == order
    assert [shard_bounds(5, World(rank, 3)) for rank in range(3)] == [(0, 2), (2, 4), (4, 5)]
