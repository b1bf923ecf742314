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

A resume checks the options against those ``last.pt`` recorded: the ones in
:data:`APPLIED_ON_RESUME` (how long, where, how often it validates / logs /
saves) may change and are reported; any other change would alter the run
half-way and is refused in one line (README, Training).

Each :meth:`Trainer.fit` says whether it starts, resumes (from where) or skips,
then prints one line per epoch (``verbose``); tqdm bars (``progress``) show the
batches. ``log.csv`` records loss and learning rate every ``log_every``
iterations and the recalls at every validation.

Under torchrun (several processes) the same loop trains on the global batch of
``batch_size`` pairs per process: each rank its shard, with the hardest negatives over
all of them, DDP for the gradients; rank 0 alone writes and logs (:mod:`sgfused.distributed`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (REQUIRED_KEYS, CheckpointError, check_same_vocabulary, checkpoint_model_config, load_checkpoint,
                         save_checkpoint)
from .data.precomp import PrecompSplit, pair_loader
from .data.vocab import Vocabulary
from .distributed import GlobalBatchLoss, barrier, current_world, gather_objects, global_sum, local_device, rank_order
from .evaluate import evaluate_model
from ._backend import choices_state, restore_choices
from ._files import remove_stale_temporaries
from .model_options import effective_model_config
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
        for field in dataclasses.fields(self):
            value, default = getattr(self, field.name), field.default
            if isinstance(default, bool):
                wrong = not isinstance(value, bool) and "true or false"
            elif isinstance(default, int):
                wrong = (isinstance(value, bool) or not isinstance(value, int)) and "an integer"
            elif isinstance(default, float):
                wrong = (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)) and "a finite number"
            else:
                wrong = not isinstance(value, str) and "a string"
            if wrong:
                raise TrainOptionError(field.name, f"must be {wrong}, got {value!r}")
        if self.amp not in AMP_DTYPES:
            raise TrainOptionError("amp", f"must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "lr_decay_epochs", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise TrainOptionError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("sum_warmup_epochs", "val_every", "checkpoint_every", "workers", "grad_clip", "margin"):
            if getattr(self, name) < 0:
                raise TrainOptionError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "lr_decay_gamma"):
            if getattr(self, name) <= 0:
                raise TrainOptionError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise TrainOptionError("seed", f"must be in [0, 2**32), got {self.seed}")
        check_device_name(self.device)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "TrainConfig":
        if not isinstance(options, dict):
            raise ValueError(f"training options must be a JSON object of name: value, got {type(options).__name__} {options!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; accepted: {sorted(known)}")
        return cls(**options)


class TrainOptionError(ValueError):
    """A training option of the wrong type or out of range; ``option`` is its :class:`TrainConfig` name."""

    def __init__(self, option: str, problem: str) -> None:
        self.option, self.problem = option, problem
        super().__init__(f"train option {option} {problem}")


# What last.pt holds beyond a model checkpoint, to resume exactly.
RESUME_KEYS = ("train_config", "optimizer", "scheduler", "scaler", "rng", "epoch", "iteration", "step", "best_rsum")

# What a resumed run does with a training option that differs from the one last.pt was trained with.
# Applied: options that do not change what is trained, only how long, where, and how often it is
# validated, logged or saved; each change is reported. Every other option changes the training
# trajectory (the optimizer, the schedule, the batches, the loss, the numerics) and is refused.
APPLIED_ON_RESUME = ("epochs", "val_every", "checkpoint_every", "log_every", "eval_batch_size", "workers", "device")


def check_device_name(name: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else is a one-line error (not torch's list)."""
    kind, _, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not (name in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit())):
        raise TrainOptionError("device", f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU; a device this machine lacks is a one-line error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TrainOptionError("device", f"is {name!r} but {built}; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainOptionError("device", f"is {name!r} but only {torch.cuda.device_count()} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainOptionError("device", f"is {name!r} but MPS is not available here")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _process_states() -> dict[str, Any]:
    """What a resumed process must get back to continue bit for bit: the random-number states, and the
    kernels ``backend="auto"``'s measure rule chose (timings could choose the other one next time)."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "auto_choices": choices_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_process_states(states: dict[str, Any]) -> None:
    version, state, *rest = states["python"]
    random.setstate((version, tuple(state), *rest))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    # generator states are CPU byte tensors, whatever map_location the checkpoint was loaded with
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    restore_choices(states.get("auto_choices", []))  # last.pt files from before the measure rule have none


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The caption order of epoch ``epoch``: a function of (seed, epoch) only, so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _check_loss_options(model: RetrievalModel, config: TrainConfig) -> None:
    """Refuse a model built with a ``margin`` / ``max_violation`` other than the training options'.

    The loss a run trains is the trainer's (``TrainConfig``), so a model option that disagrees would
    be ignored without a word while the checkpoint's model config still claimed it.
    """
    for option in ("margin", "max_violation"):
        if option in model.build_config and model.build_config[option] != getattr(config, option):
            raise ValueError(
                f"model option {option}={model.build_config[option]!r} contradicts the training option "
                f"{option}={getattr(config, option)!r}, which the loss uses: set {option} among the training "
                f"options (a config file's \"train\" section, TrainConfig) and leave it out of the model's"
            )


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
        verbose: bool = True,
    ) -> None:
        """``progress``: tqdm bars; ``verbose``: one line when the run starts, resumes or skips, and per epoch."""
        if not getattr(model, "registry_name", "") or not hasattr(model, "build_config"):
            raise ValueError("model must be built with sgfused.models.build_model so checkpoints can rebuild it")
        self.model, self.train, self.dev, self.vocab, self.config = model, train, dev, vocab, config
        self.out_dir, self.progress, self.verbose = Path(out_dir), progress, verbose
        self.world = current_world()
        self.device = local_device(resolve_device(config.device), self.world)
        self.model.to(self.device)
        self.model.set_vocabulary(vocab)
        _check_loss_options(model, config)
        self.model.margin = config.margin
        self.optimizer = torch.optim.Adam(self.model.parameter_groups(config.lr), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_decay_epochs, config.lr_decay_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.epoch = 0  # the epoch in progress
        self.iteration = 0  # iterations of that epoch already done
        self.step = 0  # iterations done in all
        self.best_rsum = -1.0
        self.changed_on_resume: dict[str, tuple[Any, Any]] = {}  # applied option changes: name -> (old, new)
        self.global_batch = config.batch_size * self.world.size
        # a last global batch of fewer pairs than processes would leave a rank without any: left out
        tail = len(train) % self.global_batch
        self.pairs_per_epoch = len(train) - (tail if tail < self.world.size else 0)
        if self.pairs_per_epoch == 0 and self.world.size > 1:
            raise ValueError(f"the training split has {len(train)} pairs, fewer than the {self.world.size} processes")
        self.batches_per_epoch = math.ceil(self.pairs_per_epoch / self.global_batch)
        self._ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None
        if self.world.size > 1:
            self.model.global_negatives = True
            # DDP averages the ranks' gradients; GlobalBatchLoss scales each share so the average is the
            # gradient of the global batch's loss. Some parameters get no gradient (SGRAF's graph_key_w.bias).
            self._ddp = torch.nn.parallel.DistributedDataParallel(
                GlobalBatchLoss(self.model, self.world),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

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
            "data": self._data_identity(),
        }

    def _data_identity(self) -> dict[str, Any]:
        return {"train": self.train.identity(), "dev": self.dev.identity()}

    def _check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        """A one-line error when this run trains or validates on other data than ``last.pt`` (best.pt would
        compare dev rSums of different splits). Checkpoints from before the record resume unchecked."""
        saved, now = state.get("data"), self._data_identity()
        if saved is None or saved == now:
            return
        changed = [f"{role} split was {saved[role]}, now {now[role]}" for role in now if saved.get(role) != now[role]]
        raise CheckpointError(
            f"cannot resume {path}: {'; '.join(changed)}; use the data and --dev-split it was trained with, "
            "or start afresh with --no-resume or another --out folder"
        )

    def save_last(self) -> None:
        """Rank 0 writes ``last.pt`` (with every rank's random-number states); every rank waits for it."""
        state = self._model_state()
        rng = _process_states()
        state.update(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng,
            world_size=self.world.size,
        )
        if self.world.size > 1:
            state["rng_ranks"] = gather_objects(rng)
        if self.world.main:
            save_checkpoint(self.out_dir / "last.pt", state)
        barrier()

    def resume(self) -> bool:
        """Continue from ``last.pt`` if the output folder has one; False when starting fresh.

        The model (name and options), the vocabulary and every training option
        outside :data:`APPLIED_ON_RESUME` must be those ``last.pt`` was trained
        with; the applied ones are recorded in ``changed_on_resume``.
        """
        path = self.out_dir / "last.pt"
        if self.world.size > 1 and len(set(gather_objects(path.exists()))) > 1:
            raise CheckpointError(f"cannot resume: some processes see {path} and some do not; --out must be a folder every node sees")
        if not path.exists():
            return False
        try:
            state = load_checkpoint(path, map_location=self.device)
        except CheckpointError as error:
            raise CheckpointError(f"cannot resume: {error}; start afresh with --no-resume (resume=False)") from error
        missing = [key for key in (*REQUIRED_KEYS, *RESUME_KEYS) if key not in state]
        if missing:
            raise CheckpointError(f"cannot resume: {path} lacks {missing} (a best.pt?); start afresh with --no-resume")
        self._check_same_model(path, state)
        saved_world = state.get("world_size", 1)  # checkpoints from before distributed training: one process
        if saved_world != self.world.size:
            raise CheckpointError(
                f"cannot resume {path}: it was trained by {saved_world} processes, this run has {self.world.size} "
                "(the per-process batch and the random streams would change half-way); resume with "
                f"{saved_world} processes, or start afresh with --no-resume or another --out folder"
            )
        check_same_vocabulary(Vocabulary.from_dict(state["vocab"], str(path)), self.vocab, "the training data")
        self._check_same_data(path, state)
        self.changed_on_resume = self._check_train_options(path, state["train_config"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration, self.step = state["epoch"], state["iteration"], state["step"]
        self.best_rsum = state["best_rsum"]
        _restore_process_states(state["rng_ranks"][self.world.rank] if self.world.size > 1 else state["rng"])
        self._truncate_log(self.step)
        return True

    def _check_same_model(self, path: Path, state: dict[str, Any]) -> None:
        name = self.model.registry_name
        if state["model_name"] != name:
            raise CheckpointError(f"{path} is a {state['model_name']!r} model, not {name!r}; use another --out folder")
        old = effective_model_config(name, checkpoint_model_config(state))
        new = effective_model_config(name, self.model.build_config)
        changed = [f"{key} was {old.get(key)!r}, now {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
                   if old.get(key) != new.get(key)]
        if changed:
            raise CheckpointError(
                f"cannot resume {path}: model option {'; '.join(changed)}; use the same options, "
                "another --out folder, or --no-resume"
            )

    def _check_train_options(self, path: Path, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The applied option changes; a one-line error for any other change (see :data:`APPLIED_ON_RESUME`)."""
        now = dataclasses.asdict(self.config)
        changed = {name: (saved[name], now[name]) for name in now if name in saved and saved[name] != now[name]}
        refused = [f"{name} was {old!r}, now {new!r}" for name, (old, new) in changed.items() if name not in APPLIED_ON_RESUME]
        if refused:
            raise CheckpointError(
                f"cannot resume {path}: train option {'; '.join(refused)} (it would change the run half-way); "
                "resume with the same value, or start afresh with --no-resume or another --out folder"
            )
        return changed

    # -- logging ------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"

    def _truncate_log(self, step: int) -> None:
        """Drop log rows written after the checkpoint being resumed (the resumed run writes them again)."""
        if not self.world.main or not self.log_path.exists():
            return
        with open(self.log_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        self._write_log(rows, mode="w")

    def _write_log(self, rows: list[dict[str, Any]], mode: str = "a") -> None:
        if not self.world.main:
            return
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
        order = epoch_order(len(self.train), self.config.seed, self.epoch)[: self.pairs_per_epoch]
        start = self.iteration * self.global_batch
        loader = pair_loader(
            self.train,
            self.config.batch_size,
            sampler=rank_order(order[start:], self.config.batch_size, self.world),
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
            loss = self.model.loss(batch) if self._ddp is None else self._ddp(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.world.size > 1:
            return global_sum(loss / self.world.size).item()  # the global batch's loss
        return loss.item()

    def validate(self) -> dict[str, float]:
        """Dev-split recalls; writes ``best.pt`` when rSum improves."""
        results, _ = evaluate_model(
            self.model, self.dev, batch_size=self.config.eval_batch_size, device=self.device, progress=False,
            shard_rows=self.world.size > 1,
        )
        metrics = results["full"]  # every rank has the whole matrix, hence the same metrics
        self.model.train()
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            if self.world.main:
                save_checkpoint(self.out_dir / "best.pt", self._model_state() | {"metrics": metrics})
        return metrics

    def fit(self, resume: bool = True, stop_after_steps: Optional[int] = None) -> dict[str, Any]:
        """Train to the configured number of epochs; returns a summary (best rSum, steps, seconds).

        ``stop_after_steps`` ends the run early after that many iterations in all
        (as if it were interrupted; no checkpoint is written at that point).
        """
        if self.world.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # a run killed while writing a checkpoint leaves its temporary file behind (atomic_write)
            remove_stale_temporaries(self.out_dir, ("last.pt", "best.pt"))
        barrier()
        resumed = resume and self.resume()
        if not resumed:
            seed_everything((self.config.seed + self.world.rank) % 2**32)  # each rank its own dropout
        self._say(self._start_line(resumed))
        start = time.time()
        log: list[dict[str, Any]] = []
        while self.epoch < self.config.epochs:
            bar = tqdm(
                self._batches(), total=self.batches_per_epoch, initial=self.iteration,
                disable=not (self.progress and self.world.main),
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
            self._say(f"epoch {self.epoch}/{self.config.epochs}: dev rSum {metrics['rsum']:.1f} "
                      f"(best {self.best_rsum:.1f}), step {self.step}, {time.time() - start:.0f} s")
        return self._summary(start, finished=True)

    def _say(self, line: str) -> None:
        if self.verbose and self.world.main:
            tqdm.write(line)  # above the bar when there is one

    def _start_line(self, resumed: bool) -> str:
        """What this call of :meth:`fit` does: start, resume (from where, with which changed options) or skip."""
        last = self.out_dir / "last.pt"
        changes = "".join(f"; {name} changed from {old!r} to {new!r}" for name, (old, new) in self.changed_on_resume.items())
        if not resumed:
            return f"starting: epoch 1/{self.config.epochs}, {self.batches_per_epoch} batches per epoch{self._world_phrase()}"
        if self.epoch >= self.config.epochs:
            return (f"skipped: {last} has finished {self.epoch} of {self.config.epochs} epochs (step {self.step}){changes}; "
                    "pass a larger --epochs to train on, or --no-resume to start afresh")
        return (f"resumed from {last}: epoch {self.epoch + 1}/{self.config.epochs}, iteration "
                f"{self.iteration}/{self.batches_per_epoch}, step {self.step}{changes}{self._world_phrase()}")

    def _world_phrase(self) -> str:
        """Under torchrun: the global batch, and the pairs each epoch leaves out (fewer than one per process)."""
        if self.world.size == 1:
            return ""
        left_out = len(self.train) - self.pairs_per_epoch
        return (f"; global batch {self.global_batch} ({self.config.batch_size} per process x {self.world.size} processes)"
                + (f", the last {left_out} pairs of each epoch's order left out (fewer than one per process)" if left_out else ""))

    @staticmethod
    def _metric_fields(metrics: dict[str, float]) -> dict[str, str]:
        return {name: f"{metrics[name]:.2f}" for name in LOG_FIELDS[6:]}

    def _summary(self, start: float, finished: bool) -> dict[str, Any]:
        return {"best_rsum": self.best_rsum, "steps": self.step, "epochs": self.epoch, "finished": finished,
                "seconds": time.time() - start, "out_dir": str(self.out_dir),
                "changed_on_resume": {name: list(change) for name, change in self.changed_on_resume.items()}}
