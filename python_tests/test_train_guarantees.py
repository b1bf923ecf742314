"""README "Training" promises, one test each: random states on resume, best.pt, clipping, margin, autocast,
the log's cadence, the resume rules (applied / refused options, model options with defaults filled in, fewer
epochs than done), ``--set`` over a config file, and the recipes in ``configs/`` (they build; max violation where the README says)."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINING_FEATURE_DIM

import sgfused
import sgfused.models.base
import sgfused.train
from sgfused.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from sgfused.cli import main
from sgfused.evaluate import evaluate_model
from sgfused.model_options import build_checked_model
from sgfused.models import build_model
from sgfused.train import APPLIED_ON_RESUME, TrainConfig, Trainer, resolve_device

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FEATURE_DIM = TRAINING_FEATURE_DIM
SMALL = {
    "vsepp": dict(img_dim=FEATURE_DIM, embed_size=16, word_dim=8),
    # SGR drops 40 % of its word embeddings while training: its steps draw from torch's global generator
    "sgraf": dict(module="SGR", embed_size=16, sim_dim=8, word_dim=8, img_dim=FEATURE_DIM, sgr_step=1),
}
BASE = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "lr_decay_epochs": 1}

# README, Training, "Resume with changed options": the two lists, as written there
README_APPLIED = {"epochs", "val_every", "checkpoint_every", "log_every", "eval_batch_size", "workers", "device"}
README_REFUSED = {"batch_size", "lr", "lr_decay_epochs", "lr_decay_gamma", "seed", "grad_clip", "margin",
                  "max_violation", "sum_warmup_epochs", "amp"}


@pytest.fixture(scope="module")
def dataset(training_data):
    return training_data


def _trainer(dataset, out, name="vsepp", init_seed=0, model_config=None, **options) -> Trainer:
    _, vocab, train, dev = dataset
    torch.manual_seed(init_seed)
    model = build_model(name, len(vocab), SMALL[name] if model_config is None else model_config)
    return Trainer(model, train, dev, vocab, TrainConfig(**{**BASE, **options}), out, progress=False)


def _assert_same_weights(want: torch.nn.Module, got: torch.nn.Module) -> None:
    want, got = want.state_dict(), got.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- exact resume: random states


def test_resume_with_dropout_gives_the_same_weights(dataset, tmp_path):
    """Guards "the random states come back from last.pt": SGR's dropout masks after a resume are those of
    an uninterrupted run, so every weight matches bit for bit (VSE++, without dropout, cannot tell)."""
    uninterrupted = _trainer(dataset, tmp_path / "a", "sgraf", checkpoint_every=4)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in uninterrupted.model.modules())
    uninterrupted.fit()
    first = _trainer(dataset, tmp_path / "b", "sgraf", checkpoint_every=4)
    assert first.fit(stop_after_steps=14)["steps"] == 14  # killed 2 steps after the last.pt of step 12, epoch 2
    # another process: other initial weights, and torch's global generator wherever they left it
    resumed = _trainer(dataset, tmp_path / "b", "sgraf", init_seed=99, checkpoint_every=4)
    summary = resumed.fit()
    assert summary["finished"] and summary["steps"] == uninterrupted.step == 2 * uninterrupted.batches_per_epoch
    _assert_same_weights(uninterrupted.model, resumed.model)


def test_how_often_a_run_validates_does_not_change_what_it_learns(dataset, tmp_path):
    """Guards "val_every changes how often it validates, not what one step does" where dropout draws from
    torch's global generator (SGR): validating every 3 steps ends with the weights of a run that validates
    only at each epoch's end, and an evaluation leaves the global generator where it was."""
    quiet = _trainer(dataset, tmp_path / "a", "sgraf")
    quiet.fit()
    busy = _trainer(dataset, tmp_path / "b", "sgraf", val_every=3)
    busy.fit()
    assert len(_log(tmp_path / "b")) > len(_log(tmp_path / "a"))  # it did validate more often
    _assert_same_weights(quiet.model, busy.model)
    before = torch.random.get_rng_state()
    evaluate_model(busy.model, dataset[3], batch_size=7)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_resume_puts_back_the_python_numpy_and_torch_states(dataset, tmp_path, monkeypatch):
    """The three global generators are, after a resume, where they were when last.pt was written."""
    at_save = []
    save = sgfused.train.save_checkpoint

    def spy(path, state):
        if Path(path).name == "last.pt":
            at_save.append((random.getstate(), np.random.get_state(), torch.get_rng_state()))
        return save(path, state)

    monkeypatch.setattr(sgfused.train, "save_checkpoint", spy)
    _trainer(dataset, tmp_path, checkpoint_every=3).fit(stop_after_steps=4)
    python, numpy, torch_state = at_save[-1]
    random.seed(11)
    np.random.seed(11)
    trainer = _trainer(dataset, tmp_path, init_seed=11, checkpoint_every=3)
    assert torch.get_rng_state().ne(torch_state).any()  # the test starts from other states
    assert trainer.resume() and trainer.step == 3
    assert random.getstate() == python
    now = np.random.get_state()
    assert now[0] == numpy[0] and np.array_equal(now[1], numpy[1]) and now[2:] == numpy[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_resume_puts_back_the_kernels_auto_chose(dataset, tmp_path, monkeypatch):
    """A GPU run's measure-rule choices go into last.pt and come back on resume, so the resumed part runs the
    kernels the first part ran (a new timing could pick the other kernel: no longer bit for bit)."""
    from sgfused import _backend

    monkeypatch.setattr(_backend, "_MEASURED", {})
    kind = ("cross_attention", "cuda:0", "fwd+bwd", "ieee", (("float32", (128, 32, 1024), True), None, 0.5))
    _backend.restore_choices([(kind, "triton", {"cuda": 2e-3, "triton": 1e-3})])  # as measured on a GPU
    _trainer(dataset, tmp_path, checkpoint_every=3).fit(stop_after_steps=4)
    assert load_checkpoint(tmp_path / "last.pt")["rng"]["auto_choices"] == [(kind, "triton", {"cuda": 2e-3, "triton": 1e-3})]
    sgfused.forget_measurements()  # another process
    assert _trainer(dataset, tmp_path, checkpoint_every=3).resume()
    assert sgfused.measured_choices() == {kind: ("triton", {"cuda": 2e-3, "triton": 1e-3})}


# ----------------------------------------------------------------------------- checkpoints


def test_best_checkpoint_holds_the_best_dev_rsum_so_far(dataset, tmp_path):
    """best.pt is the checkpoint of the step with the highest dev rSum of the log, not the last validation."""
    trainer = _trainer(dataset, tmp_path, val_every=2)
    trainer.fit()
    validations = [(int(row["step"]), float(row["rsum"])) for row in _log(tmp_path) if row["rsum"]]
    rsums = [rsum for _, rsum in validations]
    best_rsum = max(rsums)
    assert rsums[-1] < best_rsum  # measured: 425 at step 2, 400 from then on; else the test cannot fail
    best_step = next(step for step, rsum in validations if rsum == best_rsum)  # the first to reach it
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["metrics"]["rsum"] == pytest.approx(best_rsum, abs=0.005)  # the log rounds to 2 decimals
    assert best["step"] == best_step
    assert load_checkpoint(tmp_path / "last.pt")["best_rsum"] == pytest.approx(best_rsum, abs=0.005)
    model, _ = model_from_checkpoint(best)  # and its weights are those of that step: they score it again
    assert evaluate_model(model, dataset[3], progress=False)[0]["full"]["rsum"] == pytest.approx(best["metrics"]["rsum"])


# ----------------------------------------------------------------------------- what one step does


def _gradient_norms_at_step(trainer: Trainer) -> list[float]:
    """The norm of all gradients each time the optimizer steps (after any clipping)."""
    norms = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad.detach().flatten() for p in trainer.model.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())

    trainer.optimizer.register_step_pre_hook(before_step)
    return norms


def test_grad_clip_clips_to_the_configured_norm(dataset, tmp_path, monkeypatch):
    """Every step's gradient norm is at most grad_clip, and exactly grad_clip where it was larger; with
    grad_clip 0 (TrainConfig: "0 disables clipping") clip_grad_norm_ is never called."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    free = _trainer(dataset, tmp_path / "free", epochs=1, grad_clip=0.0)
    unclipped = _gradient_norms_at_step(free)
    free.fit()
    assert calls == [] and len(unclipped) == free.step
    max_norm = 0.5
    assert unclipped[0] > 2 * max_norm  # the first step (same weights and batch in both runs) gets clipped

    clipped_run = _trainer(dataset, tmp_path / "clipped", epochs=1, grad_clip=max_norm)
    clipped = _gradient_norms_at_step(clipped_run)
    clipped_run.fit()
    assert calls == [max_norm] * clipped_run.step
    assert all(norm <= max_norm * (1 + 1e-5) for norm in clipped), clipped
    assert clipped[0] == pytest.approx(max_norm, rel=1e-4)


def test_margin_reaches_the_model_and_its_loss(dataset, tmp_path, monkeypatch):
    """Trainer(margin=0.5) sets model.margin, and every training loss is computed with margin 0.5."""
    margins = []
    loss = sgfused.models.base.hardest_negative_loss

    def spy(*args, **kwargs):
        margins.append(kwargs["margin"])
        return loss(*args, **kwargs)

    monkeypatch.setattr(sgfused.models.base, "hardest_negative_loss", spy)
    trainer = _trainer(dataset, tmp_path, epochs=1, margin=0.5)
    assert trainer.model.margin == 0.5
    trainer.fit(stop_after_steps=3)
    assert margins == [0.5] * 3


@pytest.mark.parametrize("option, value, train_value", [("margin", 0.5, 0.2), ("max_violation", False, True)])
def test_a_model_built_with_another_loss_option_than_the_training_is_refused(dataset, tmp_path, capsys, option,
                                                                           value, train_value):
    """The loss is the trainer's: a model built with `margin` / `max_violation` other than the training options (as
    `--set margin=0.5` builds it) is refused in one line, not trained with the training options without a word; given
    equal to them, it trains."""
    _, vocab, _, _ = dataset
    model_config = {**SMALL["sgraf"], option: value}
    message = f"model option {option}={value!r} contradicts the training option {option}={train_value!r}"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        _trainer(dataset, tmp_path / "a", "sgraf", model_config=model_config)
    assert "\n" not in str(error.value) and not (tmp_path / "a").exists()
    trainer = _trainer(dataset, tmp_path / "b", "sgraf", model_config=model_config, **{option: value})
    assert getattr(trainer.model, option) == value
    data = dataset[0]
    with open(tmp_path / "set.json", "w") as handle:  # the command line: --set goes to the model's options
        json.dump({"model": "sgraf", "model_config": SMALL["sgraf"], "train": BASE}, handle)
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--config", str(tmp_path / "set.json"), "--out", str(tmp_path / "c"),
                 "--set", f"{option}={json.dumps(value)}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@pytest.mark.parametrize("amp, dtype", [("none", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_under_autocast(dataset, tmp_path, monkeypatch, amp, dtype):
    """--amp bf16|fp16: model.loss runs with autocast on for the training device, in that dtype; none: off."""
    trainer = _trainer(dataset, tmp_path, epochs=1, amp=amp)
    device_type = trainer.device.type
    seen = []
    loss = trainer.model.loss

    def spy(batch):
        enabled = torch.is_autocast_enabled(device_type)
        seen.append((enabled, torch.get_autocast_dtype(device_type) if enabled else None))
        return loss(batch)

    monkeypatch.setattr(trainer.model, "loss", spy)
    trainer.fit(stop_after_steps=2)
    assert seen == [(dtype is not None, dtype)] * 2
    assert not torch.is_autocast_enabled(device_type)  # and off again after the run


@pytest.mark.parametrize("log_every, interrupt_at", [(3, None), (4, None), (3, 13)])
def test_loss_is_logged_exactly_every_log_every_iterations(dataset, tmp_path, log_every, interrupt_at):
    """The rows with a loss are those of steps log_every, 2 log_every, ... across epochs and a resume."""
    if interrupt_at:
        _trainer(dataset, tmp_path, log_every=log_every, checkpoint_every=5).fit(stop_after_steps=interrupt_at)
    trainer = _trainer(dataset, tmp_path, log_every=log_every, checkpoint_every=5)
    trainer.fit()
    rows = [row for row in _log(tmp_path) if row["loss"]]
    assert [int(row["step"]) for row in rows] == list(range(log_every, trainer.step + 1, log_every))
    assert all(float(row["loss"]) > 0 and float(row["lr"]) > 0 for row in rows)


# ----------------------------------------------------------------------------- resume with changed options


def test_the_resume_rules_are_those_of_the_readme():
    """APPLIED_ON_RESUME is the README's applied list, and every training option is in one of its two lists."""
    assert set(APPLIED_ON_RESUME) == README_APPLIED
    assert {field.name for field in dataclasses.fields(TrainConfig)} == README_APPLIED | README_REFUSED
    assert not README_APPLIED & README_REFUSED


# the device spelt as this machine resolves "auto" ("cpu" here): the run stays on the same device
APPLIED_CHANGES = [("epochs", 3), ("val_every", 4), ("checkpoint_every", 4), ("log_every", 2),
                   ("eval_batch_size", 7), ("workers", 1), ("device", resolve_device("auto").type)]


@pytest.mark.parametrize("option, value", APPLIED_CHANGES, ids=[option for option, _ in APPLIED_CHANGES])
def test_resume_applies_and_reports_an_applied_option(dataset, tmp_path, capsys, option, value):
    """Resuming with an applied option changed succeeds, says "X changed from A to B" on the resume line,
    records B in last.pt, and ends with the weights of an uninterrupted run of the new command."""
    assert option in README_APPLIED
    old = getattr(TrainConfig(**BASE, checkpoint_every=3), option)
    assert old != value
    uninterrupted = _trainer(dataset, tmp_path / "a", **{"checkpoint_every": 3, option: value})
    uninterrupted.fit()
    _trainer(dataset, tmp_path / "b", checkpoint_every=3).fit(stop_after_steps=4)
    capsys.readouterr()
    resumed = _trainer(dataset, tmp_path / "b", init_seed=99, **{"checkpoint_every": 3, option: value})
    summary = resumed.fit()
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"resumed from {tmp_path / 'b' / 'last.pt'}: ") and "step 3" in line
    assert f"{option} changed from {old!r} to {value!r}" in line
    assert summary["finished"] and summary["changed_on_resume"] == {option: [old, value]}
    assert load_checkpoint(tmp_path / "b" / "last.pt")["train_config"][option] == value
    _assert_same_weights(uninterrupted.model, resumed.model)


REFUSED_CHANGES = [("batch_size", 8), ("lr", 5e-4), ("lr_decay_epochs", 2), ("lr_decay_gamma", 0.5), ("seed", 1),
                   ("grad_clip", 1.0), ("margin", 0.1), ("max_violation", False), ("sum_warmup_epochs", 1),
                   ("amp", "bf16")]


def test_every_refused_option_is_parametrized():
    """The refusal test below covers every option the README refuses."""
    assert {option for option, _ in REFUSED_CHANGES} == README_REFUSED


@pytest.mark.parametrize("option, value", REFUSED_CHANGES, ids=[option for option, _ in REFUSED_CHANGES])
def test_resume_refuses_an_option_in_one_line_and_writes_nothing(dataset, tmp_path, option, value):
    """A refused change is one line naming the option and both values, and leaves the folder as it was."""
    _trainer(dataset, tmp_path, checkpoint_every=3, val_every=3).fit(stop_after_steps=4)
    before = _files(tmp_path)
    assert {"last.pt", "best.pt", "log.csv"} <= before.keys()
    old = getattr(TrainConfig(**BASE), option)
    assert old != value
    with pytest.raises(CheckpointError) as error:
        _trainer(dataset, tmp_path, checkpoint_every=3, val_every=3, **{option: value}).fit()
    message = str(error.value)
    assert "\n" not in message
    assert f"train option {option} was {old!r}, now {value!r}" in message and "--no-resume" in message
    assert _files(tmp_path) == before


def test_resume_refuses_other_data_in_one_line_and_follows_a_moved_folder(dataset, tmp_path):
    """best.pt keeps the best dev rSum so far, so a resume that validates on another split (--dev-split) or
    trains on other data is refused in one line naming the split, and the folder is left as it was; the
    same data copied to another folder resumes."""
    import shutil

    from sgfused.data.precomp import PrecompSplit

    root, vocab, train, dev = dataset
    _trainer(dataset, tmp_path / "run", checkpoint_every=3).fit(stop_after_steps=4)
    before = _files(tmp_path / "run")
    for other in ((root, vocab, train, PrecompSplit(root, "test", vocab)), (root, vocab, dev, dev)):
        with pytest.raises(CheckpointError) as error:
            _trainer(other, tmp_path / "run", checkpoint_every=3).fit()
        message = str(error.value)
        assert "\n" not in message and "--no-resume" in message
        assert ("dev split was" in message) if other[2] is train else ("train split was" in message)
        assert _files(tmp_path / "run") == before
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    copy = (moved, vocab, PrecompSplit(moved, "train", vocab), PrecompSplit(moved, "dev", vocab))
    assert _trainer(copy, tmp_path / "run", checkpoint_every=3).fit()["finished"]


def test_model_options_are_compared_with_the_defaults_filled_in(dataset, tmp_path, capsys):
    """A model option given explicitly at its default, or left out where last.pt gave it, is no change."""
    explicit = {**SMALL["vsepp"], "num_layers": 1}  # vsepp's default
    _trainer(dataset, tmp_path / "a", model_config=explicit, checkpoint_every=3).fit(stop_after_steps=3)
    _trainer(dataset, tmp_path / "b", checkpoint_every=3).fit(stop_after_steps=3)
    capsys.readouterr()
    for out, model_config in [
        ("a", SMALL["vsepp"]),  # num_layers=1 recorded, left out now
        ("b", {**SMALL["vsepp"], "bi_gru": True}),  # left out in last.pt, given now at its default
    ]:
        trainer = _trainer(dataset, tmp_path / out, model_config=model_config, checkpoint_every=3)
        assert trainer.fit(stop_after_steps=5)["changed_on_resume"] == {}
        assert capsys.readouterr().out.startswith("resumed from ")


@pytest.mark.parametrize("name, model_config, message", [
    ("vsepp", {**SMALL["vsepp"], "bi_gru": False}, "model option bi_gru was True, now False"),  # default filled in
    ("sgraf", SMALL["sgraf"], "is a 'vsepp' model, not 'sgraf'; use another --out folder"),
])
def test_resume_refuses_another_model_or_model_option(dataset, tmp_path, name, model_config, message):
    """Another model, or a model option off the recorded one (the default where last.pt left it out), is refused."""
    _trainer(dataset, tmp_path, checkpoint_every=3).fit(stop_after_steps=3)
    before = _files(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        _trainer(dataset, tmp_path, name, model_config=model_config, checkpoint_every=3).fit()
    assert "\n" not in str(error.value)
    assert _files(tmp_path) == before


def test_fewer_epochs_than_done_reports_the_run_as_skipped(dataset, tmp_path, capsys):
    """epochs at or below the epochs done: "skipped: ... has finished", nothing trained, nothing rewritten."""
    _trainer(dataset, tmp_path, epochs=2).fit()
    before = _files(tmp_path)
    capsys.readouterr()
    for epochs in (1, 2):
        trainer = _trainer(dataset, tmp_path, init_seed=99, epochs=epochs)
        summary = trainer.fit()
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith(f"skipped: {tmp_path / 'last.pt'} has finished 2 of {epochs} epochs")
        assert ("epochs changed from 2 to 1" in line) == (epochs == 1)
        assert summary["finished"] and summary["steps"] == 2 * trainer.batches_per_epoch
        saved = load_checkpoint(tmp_path / "last.pt")["model"]
        assert all(torch.equal(value, saved[key]) for key, value in trainer.model.state_dict().items())
        assert _files(tmp_path) == before


# ----------------------------------------------------------------------------- the command line and configs/


def test_set_and_flags_override_the_config_file(dataset, tmp_path, capsys):
    """sgfused train --config F --set embed_size=8 --batch-size 20: the file's other entries, those two overridden."""
    root = dataset[0]
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"model": "vsepp", "model_config": SMALL["vsepp"],
                                  "train": {"epochs": 1, "batch_size": 16, "lr": 0.003}}))
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(root), "--out", str(out), "--set", "embed_size=8",
            "--batch-size", "20", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    state = load_checkpoint(out / "last.pt")
    assert state["model_config"] == {**SMALL["vsepp"], "embed_size": 8}
    assert (state["train_config"]["batch_size"], state["train_config"]["lr"]) == (20, 0.003)
    assert state["model"]["image_encoder.fc.weight"].shape == (8, FEATURE_DIM)  # the weights were built so


def _recipes() -> list[Path]:
    return sorted(CONFIGS.glob("*.json"))


def test_every_recipe_parses_and_builds():
    """Each configs/*.json has the three sections, a model built from its options, valid training options."""
    assert len(_recipes()) >= 20
    for path in _recipes():
        recipe = json.loads(path.read_text())
        assert set(recipe) <= {"model", "model_config", "train"} and "model" in recipe, path.name
        build_checked_model(recipe["model"], 20, recipe.get("model_config", {}))
        TrainConfig.from_dict(recipe.get("train", {}))


def test_recipes_max_violation_is_the_readmes():
    """README: the synthetic recipes of SGRAF, MPSM and SGFN use max_violation false; the paper recipes
    (Flickr30K, COCO) keep max violation, as published."""
    synthetic = [p for p in _recipes() if re.fullmatch(r"(sgraf|mpsm|sgfn)_synthetic(_\w+)?\.json", p.name)]
    paper = [p for p in _recipes() if re.search(r"_(f30k|coco)(_|\.json)", p.name)]
    assert len(synthetic) == 7 and len(paper) == 16
    for path in synthetic + paper:
        config = TrainConfig.from_dict(json.loads(path.read_text()).get("train", {}))
        assert config.max_violation == (path in paper), path.name

