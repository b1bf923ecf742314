"""One training loop for every model in :mod:`sgfused.models`.

Adam with a step learning-rate decay, gradient clipping, the model's own loss
(the in-batch hardest-negative triplet loss for the papers here), validation
rSum on the dev split every epoch (and every ``val_every`` iterations), and two
checkpoints in the output folder, both written atomically:

- ``best.pt``: the weights with the best dev rSum so far;
- ``last.pt``: everything needed to resume *exactly*: weights, optimizer,
  scheduler, epoch, iteration, best rSum and the random-number states.

Exact resume works because nothing random depends on how the run got where it
is: the order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)`` (resuming skips the batches already done), the data loader has its
own generator, and the global torch / numpy / python states (dropout) are
restored from the checkpoint. A run killed at any point and resumed with
``resume=True`` ends with the same weights as an uninterrupted run.

Progress is shown with tqdm; ``log.csv`` records loss and learning rate every
``log_every`` iterations and the recalls at every validation.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, check_same_vocabulary, load_checkpoint, save_checkpoint
from .data.precomp import PrecompSplit, pair_loader
from .data.vocab import Vocabulary
from .evaluate import evaluate_model
from .models import RetrievalModel

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_FIELDS = ("epoch", "iteration", "step", "loss", "lr", "seconds", "rsum", "i2t_r1", "i2t_r5", "i2t_r10",
              "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class TrainConfig:
    """Training options; the defaults are SGRAF's Flickr30K SGR recipe."""

    epochs: int = 40
    lr: float = 2e-4
    lr_decay_epochs: int = 30  # multiply the learning rate by lr_decay_gamma every this many epochs
    lr_decay_gamma: float = 0.1
    batch_size: int = 128
    grad_clip: float = 2.0  # max gradient norm; 0 disables clipping
    margin: float = 0.2
    max_violation: bool = True
    # epochs of summed hinges before max violation starts (VSE-infinity's warm-up): SGRAF-style score
    # heads collapse to a constant under max violation from a random start (README, Training)
    sum_warmup_epochs: int = 0
    val_every: int = 0  # also validate every this many iterations (0: only at the end of each epoch)
    checkpoint_every: int = 0  # also write last.pt every this many iterations (0: at validations only)
    log_every: int = 10
    eval_batch_size: int = 128
    workers: int = 0
    seed: int = 0
    amp: str = "none"  # "none" | "bf16" | "fp16": autocast of the forward pass
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "lr_decay_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sum_warmup_epochs < 0:
            raise ValueError(f"sum_warmup_epochs must be >= 0, got {self.sum_warmup_epochs}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; accepted: {sorted(known)}")
        return cls(**options)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    version, state, *rest = states["python"]
    random.setstate((version, tuple(state), *rest))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    # generator states are CPU byte tensors, whatever map_location the checkpoint was loaded with
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The caption order of epoch ``epoch``: a function of (seed, epoch) only, so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class Trainer:
    """Trains ``model`` on ``train`` and selects checkpoints by rSum on ``dev``; see the module docstring."""

    def __init__(
        self,
        model: RetrievalModel,
        train: PrecompSplit,
        dev: PrecompSplit,
        vocab: Vocabulary,
        config: TrainConfig,
        out_dir: str | Path,
        progress: bool = True,
    ) -> None:
        if not getattr(model, "registry_name", "") or not hasattr(model, "build_config"):
            raise ValueError("model must be built with sgfused.models.build_model so checkpoints can rebuild it")
        self.model, self.train, self.dev, self.vocab, self.config = model, train, dev, vocab, config
        self.out_dir, self.progress = Path(out_dir), progress
        self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.model.set_vocabulary(vocab)
        self.model.margin = config.margin
        self.optimizer = torch.optim.Adam(self.model.parameter_groups(config.lr), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_decay_epochs, config.lr_decay_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.epoch = 0  # the epoch in progress
        self.iteration = 0  # iterations of that epoch already done
        self.step = 0  # iterations done in all
        self.best_rsum = -1.0
        self.batches_per_epoch = len(train) // config.batch_size + (len(train) % config.batch_size > 0)

    # -- checkpoints --------------------------------------------------------------------------------------

    def _model_state(self) -> dict[str, Any]:
        return {
            "model_name": self.model.registry_name,
            "model_config": self.model.build_config,
            "vocab": self.vocab.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "step": self.step,
            "best_rsum": self.best_rsum,
        }

    def save_last(self) -> None:
        state = self._model_state()
        state.update(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=_rng_states(),
        )
        save_checkpoint(self.out_dir / "last.pt", state)

    def resume(self) -> bool:
        """Continue from ``last.pt`` if the output folder has one; False when starting fresh."""
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        state = load_checkpoint(path, map_location=self.device)
        if state["model_name"] != self.model.registry_name or state["model_config"] != self.model.build_config:
            raise CheckpointError(
                f"{path} is a {state['model_name']!r} model with config {state['model_config']}, not "
                f"{self.model.registry_name!r} with {self.model.build_config}; use another --out folder"
            )
        check_same_vocabulary(Vocabulary.from_dict(state["vocab"]), self.vocab, "the training data")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration, self.step = state["epoch"], state["iteration"], state["step"]
        self.best_rsum = state["best_rsum"]
        _restore_rng_states(state["rng"])
        self._truncate_log(self.step)
        return True

    # -- logging ------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"

    def _truncate_log(self, step: int) -> None:
        """Drop log rows written after the checkpoint being resumed (the resumed run writes them again)."""
        if not self.log_path.exists():
            return
        with open(self.log_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        self._write_log(rows, mode="w")

    def _write_log(self, rows: list[dict[str, Any]], mode: str = "a") -> None:
        new = mode == "w" or not self.log_path.exists()
        with open(self.log_path, mode, newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    # -- the loop -----------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.config.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _batches(self) -> Iterator:
        order = epoch_order(len(self.train), self.config.seed, self.epoch)
        start = self.iteration * self.config.batch_size
        loader = pair_loader(
            self.train,
            self.config.batch_size,
            sampler=order[start:],
            generator=torch.Generator().manual_seed(self.config.seed),
            workers=self.config.workers,
        )
        return iter(loader)

    @property
    def max_violation(self) -> bool:
        """The loss of the epoch in progress: summed hinges during the warm-up, then ``config.max_violation``."""
        return self.config.max_violation and self.epoch >= self.config.sum_warmup_epochs

    def train_step(self, batch) -> float:
        self.model.train()
        self.model.max_violation = self.max_violation
        batch = batch.to(self.device)
        with self._autocast():
            loss = self.model.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    def validate(self) -> dict[str, float]:
        """Dev-split recalls; writes ``best.pt`` when rSum improves."""
        results, _ = evaluate_model(
            self.model, self.dev, batch_size=self.config.eval_batch_size, device=self.device, progress=False
        )
        metrics = results["full"]
        self.model.train()
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            save_checkpoint(self.out_dir / "best.pt", self._model_state() | {"metrics": metrics})
        return metrics

    def fit(self, resume: bool = True, stop_after_steps: Optional[int] = None) -> dict[str, Any]:
        """Train to the configured number of epochs; returns a summary (best rSum, steps, seconds).

        ``stop_after_steps`` ends the run early after that many iterations in all
        (as if it were interrupted; no checkpoint is written at that point).
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.resume()
        if not resumed:
            seed_everything(self.config.seed)
        start = time.time()
        log: list[dict[str, Any]] = []
        while self.epoch < self.config.epochs:
            bar = tqdm(
                self._batches(), total=self.batches_per_epoch, initial=self.iteration, disable=not self.progress,
                desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
            )
            for batch in bar:
                if stop_after_steps is not None and self.step >= stop_after_steps:
                    self._write_log(log)
                    return self._summary(start, finished=False)
                loss = self.train_step(batch)
                self.iteration += 1
                self.step += 1
                bar.set_postfix(loss=f"{loss:.3f}")
                row = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step, "loss": f"{loss:.6g}",
                       "lr": f"{self.scheduler.get_last_lr()[0]:.6g}", "seconds": f"{time.time() - start:.2f}"}
                validate = self.config.val_every and self.step % self.config.val_every == 0
                if validate:
                    row.update(self._metric_fields(self.validate()))
                if validate or self.step % self.config.log_every == 0:
                    log.append(row)
                if validate or (self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0):
                    self._write_log(log)
                    log = []
                    self.save_last()
            lr = self.scheduler.get_last_lr()[0]  # the rate this epoch ran with
            self.epoch += 1
            self.iteration = 0
            self.scheduler.step()
            metrics = self.validate()
            log.append({"epoch": self.epoch - 1, "iteration": self.batches_per_epoch, "step": self.step,
                        "lr": f"{lr:.6g}", "seconds": f"{time.time() - start:.2f}", **self._metric_fields(metrics)})
            self._write_log(log)
            log = []
            self.save_last()
            if self.progress:
                tqdm.write(f"epoch {self.epoch}/{self.config.epochs}: dev rSum {metrics['rsum']:.1f} "
                           f"(best {self.best_rsum:.1f}), {time.time() - start:.0f} s")
        return self._summary(start, finished=True)

    @staticmethod
    def _metric_fields(metrics: dict[str, float]) -> dict[str, str]:
        return {name: f"{metrics[name]:.2f}" for name in LOG_FIELDS[6:]}

    def _summary(self, start: float, finished: bool) -> dict[str, Any]:
        return {"best_rsum": self.best_rsum, "steps": self.step, "epochs": self.epoch, "finished": finished,
                "seconds": time.time() - start, "out_dir": str(self.out_dir)}
