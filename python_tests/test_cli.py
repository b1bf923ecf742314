"""The ``sgfused`` command line end to end on a tiny synthetic dataset, its help, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sgfused.cli import main
from sgfused.evaluate import save_similarity

TINY_MODEL = ["--set", "img_dim=16", "embed_size=16", "word_dim=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    assert main(["data", "synth", "--out", str(root), "--images", "40", "--seed", "1", "--feature-dim", "16", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    args = ["train", "--model", "vsepp", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "16",
            *TINY_MODEL, "--quiet"]
    assert main(args) == 0
    return out / "best.pt"


@pytest.mark.parametrize(
    "command", [[], ["data"], ["data", "synth"], ["data", "vocab"], ["data", "parse"], ["train"], ["eval"],
                ["eval-ensemble"], ["info"]]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: sgfused" in capsys.readouterr().out


def test_train_eval_and_ensemble(data, checkpoint, tmp_path, capsys):
    assert (checkpoint.parent / "last.pt").exists() and (checkpoint.parent / "log.csv").exists()
    sims = [tmp_path / "a", tmp_path / "b"]
    for path in sims:
        args = ["eval", str(checkpoint), "--data", str(data), "--split", "test", "--save-sims", str(path),
                "--json", str(tmp_path / "results.json"), "--quiet"]
        assert main(args) == 0
    table = capsys.readouterr().out
    assert "R@1" in table and "rsum" in table
    results = json.loads((tmp_path / "results.json").read_text())
    saved = np.load(tmp_path / "a.npy")
    assert saved.shape == (4, 20) and saved.dtype == np.float32  # 10% of 40 images, 5 captions each
    assert main(["eval-ensemble", str(sims[0]) + ".npy", str(sims[1]) + ".npy", "--json", str(tmp_path / "ens.json")]) == 0
    ensemble = json.loads((tmp_path / "ens.json").read_text())
    assert ensemble["full"]["rsum"] == pytest.approx(results["full"]["rsum"])  # the mean of two equal matrices


def test_train_resumes_and_config_files(data, tmp_path, capsys):
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"model": "vsepp", "model_config": {"img_dim": 16, "embed_size": 16, "word_dim": 8},
                                  "train": {"epochs": 1, "batch_size": 16}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    log_rows = (out / "log.csv").read_text().splitlines()
    capsys.readouterr()
    # a second call finds last.pt at the end of the schedule and has nothing left to do
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    assert (out / "log.csv").read_text().splitlines() == log_rows
    skipped = capsys.readouterr().out
    assert skipped.splitlines()[1].startswith("skipped: ") and "training" not in skipped
    # --quiet keeps the start line and one line per epoch, without bars
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet", "--epochs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "resumed from" in lines[1] and "epochs changed from 1 to 2" in lines[1] and lines[2].startswith("epoch 2/2: ")


def test_train_with_one_seed_gives_one_model(data, tmp_path):
    states = []
    for run in ("a", "b"):
        torch.manual_seed(len(states))  # whatever the global state before the command
        args = ["train", "--model", "vsepp", "--data", str(data), "--out", str(tmp_path / run), "--epochs", "1",
                "--batch-size", "16", "--seed", "3", "--sum-warmup-epochs", "1", *TINY_MODEL, "--quiet"]
        assert main(args) == 0
        states.append(torch.load(tmp_path / run / "last.pt", weights_only=False)["model"])
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_data_vocab(data, tmp_path, capsys):
    out = tmp_path / "vocab.json"
    assert main(["data", "vocab", "--data", str(data), "--threshold", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["word2idx"] == json.loads((data / "vocab.json").read_text())["word2idx"]


def test_info_runs_as_a_module(tmp_path):
    # from another folder: `-m` puts the working directory first on sys.path, and the checkout's
    # uncompiled sources would shadow the installed package
    done = subprocess.run([sys.executable, "-m", "sgfused", "info"], capture_output=True, text=True, check=True,
                          cwd=tmp_path)
    info = json.loads(done.stdout)
    assert "cpu" in info["backends"] and "vsepp" in info["models"]


def _fails(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgfused ") and "Traceback" not in err
    return err


def test_user_errors_are_one_line(data, checkpoint, tmp_path, capsys):
    assert "unknown model 'nope'" in _fails(["train", "--model", "nope", "--data", str(data)], capsys)
    assert "does not exist" in _fails(["train", "--model", "vsepp", "--data", str(tmp_path / "none")], capsys)
    assert "KEY=VALUE" in _fails(["train", "--model", "vsepp", "--data", str(data), "--set", "embed_size"], capsys)
    assert "unknown config keys" in _fails(["train", "--model", "vsepp", "--data", str(data), "--set", "size=3"], capsys)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "vsepp", "optimizer": {}}))
    assert "unknown sections" in _fails(["train", "--config", str(bad), "--data", str(data)], capsys)
    assert "no model given" in _fails(["train", "--data", str(data)], capsys)
    other_vocab = tmp_path / "other_vocab.json"
    other_vocab.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 4},
                                       "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "x"},
                                       "idx": 5}))
    args = ["eval", str(checkpoint), "--data", str(data), "--vocab", str(other_vocab), "--quiet"]
    assert "vocabulary mismatch" in _fails(args, capsys)
    assert "not a readable sgfused checkpoint" in _fails(["eval", str(other_vocab), "--data", str(data)], capsys)
    args = ["eval", str(checkpoint), "--data", str(data), "--similarity-dtype", "bf16", "--quiet"]
    assert "VSEPP.similarity takes no dtype" in _fails(args, capsys)
    save_similarity(tmp_path / "small", torch.zeros(2, 10), {"split": "test"})
    save_similarity(tmp_path / "large", torch.zeros(4, 20), {"split": "test"})
    assert "shape" in _fails(["eval-ensemble", str(tmp_path / "small.npy"), str(tmp_path / "large.npy")], capsys)


def _train(data, out, *extra):
    return ["train", "--model", "vsepp", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "16",
            *TINY_MODEL, "--quiet", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "embed_size=abc"], "--set: model option embed_size must be an integer (default 1024), got 'abc'"),
        (["--set", "embed_size=1.5"], "embed_size must be an integer (default 1024), got 1.5"),
        (["--set", "embed_size=[16]"], "embed_size must be an integer (default 1024), got [16]"),
        (["--set", "embed_size=null"], "embed_size must be an integer (default 1024), got None"),
        (["--set", "embed_size=-4"], "cannot be built with img_dim=16, embed_size=-4, word_dim=8:"),
        (["--set", "embed_size=0"], "cannot be built with img_dim=16, embed_size=0, word_dim=8:"),
        (["--set", "bi_gru=maybe"], "model option bi_gru must be true or false (default True), got 'maybe'"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--captions-per-image", "4"], "has 160 captions for the 32 images"),
    ],
)
def test_train_refuses_bad_options_in_one_line(data, tmp_path, capsys, extra, message):
    assert message in _fails(_train(data, tmp_path / "run", *extra), capsys)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_refuses_bad_config_sections(data, tmp_path, capsys):
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"model": "vsepp", "model_config": {"img_dim": 16}, "train": {"lr": "fast"}}))
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run")]
    assert f"config file {config}: train.lr must be a finite number, got 'fast'" in _fails(args, capsys)
    config.write_text(json.dumps({"model": "vsepp", "model_config": [16]}))
    assert '"model_config" must be a JSON object of name: value, got list [16]' in _fails(args, capsys)


def test_cuda_without_cuda_is_one_line(data, tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device is 'cuda' but" in _fails(_train(data, tmp_path / "run", "--device", "cuda"), capsys)
    assert "--device is 'cuda' but" in _fails(["eval", str(checkpoint), "--data", str(data), "--device", "cuda"], capsys)


def test_edited_or_damaged_checkpoints_are_one_line(data, checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    cases = {
        "weights": {**state, "model": {k: v[:1] for k, v in state["model"].items()}},
        "config": {**state, "model_config": {**state["model_config"], "embed_size": 8}},
        "types": {**state, "model_config": {**state["model_config"], "embed_size": "16"}},
        "vocab": {key: value for key, value in state.items() if key != "vocab"},
        "not_mapping": {**state, "model_config": [16]},
        "name": {**state, "model_name": "vse"},
    }
    messages = {"weights": "the weights do not fit a 'vsepp' model", "config": "the weights do not fit",
                "types": "model option embed_size must be an integer", "vocab": "incomplete sgfused checkpoint: it lacks ['vocab']",
                "not_mapping": "model options must be a JSON object of name: value, got list", "name": "unknown model 'vse'"}
    for name, edited in cases.items():
        torch.save(edited, tmp_path / f"{name}.pt")
        assert messages[name] in _fails(["eval", str(tmp_path / f"{name}.pt"), "--data", str(data)], capsys)
    assert "is a folder, not a file: pass" in _fails(["eval", str(checkpoint.parent), "--data", str(data)], capsys)
    assert "--batch-size must be >= 1, got 0" in _fails(["eval", str(checkpoint), "--data", str(data), "--batch-size", "0"], capsys)
    err = _fails(["eval", str(checkpoint), "--data", str(data), "--captions-per-image", "0"], capsys)
    assert "--captions-per-image must be >= 1, got 0" in err
    raw = checkpoint.read_bytes()
    for size in (100, len(raw) // 2, len(raw) - 10):
        (tmp_path / "cut.pt").write_bytes(raw[:size])
        err = _fails(["eval", str(tmp_path / "cut.pt"), "--data", str(data)], capsys)
        assert f"{size} bytes that are not a complete torch archive" in err and "Errno" not in err


def test_official_checkpoint_with_a_foreign_object_is_one_line(data, tmp_path, capsys):
    import argparse
    import copy

    torch.save({"model": [{}, {}, {}], "opt": argparse.Namespace(a=1), "extra": copy.Error("no")}, tmp_path / "evil.pth")
    args = ["eval", str(tmp_path / "evil.pth"), "--data", str(data), "--official", "sgraf", "--vocab", str(data / "vocab.json")]
    assert "(unpickling runs code): copy.Error is not allowed" in _fails(args, capsys)


def test_data_commands_refuse_to_overwrite(data, tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    assert "is an existing file" in _fails(["data", "synth", "--out", str(existing), "--images", "10"], capsys)
    gold = (data / "test_caps_graphs.json").read_bytes()
    assert "pass --overwrite" in _fails(["data", "parse", "--data", str(data), "--split", "test"], capsys)
    assert (data / "test_caps_graphs.json").read_bytes() == gold and existing.read_text() == "keep me"


def test_eval_ensemble_refuses_another_dataset(tmp_path, capsys):
    save_similarity(tmp_path / "a", torch.zeros(2, 10), {"split": "test", "data": "/x/f30k", "captions_per_image": 5})
    save_similarity(tmp_path / "b", torch.zeros(2, 10), {"split": "test", "data": "/x/coco", "captions_per_image": 5})
    err = _fails(["eval-ensemble", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], capsys)
    assert "different datasets" in err and "'/x/f30k'" in err and "'/x/coco'" in err


@pytest.mark.parametrize(
    "command, flags",
    [(["train"], ["--epochs", "--batch-size", "--lr", "--seed"]), (["eval"], ["--split", "--batch-size", "--device"]),
     (["eval-ensemble"], ["--fold5"])],
)
def test_help_explains_every_option_with_its_default(command, flags, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    lines = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        text = lines.split(f" {flag} ")[-1].split(" --")[0]  # "METAVAR help text" up to the next option
        assert not text.startswith("-") and len(text) > 20, (flag, text)  # the flag has a help text
        assert ("5-fold" if flag == "--fold5" else "default") in text, (flag, text)


def test_bad_input_exits_with_status_2_and_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sgfused", "train", "--model", "vsepp", "--data", str(tmp_path),
                           "--device", "tpu"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["sgfused train: error: --device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"]


def test_eval_of_a_checkpoint_in_the_papers_layout(data, tmp_path, capsys):
    from sgfused.data.vocab import Vocabulary
    from sgfused.models import build_model

    vocab = Vocabulary.load(data / "vocab.json")
    model = build_model("sgraf", len(vocab), dict(img_dim=16, embed_size=16, word_dim=8, sim_dim=8))
    model.to_official(tmp_path / "model_best.pth.tar")
    args = ["eval", str(tmp_path / "model_best.pth.tar"), "--data", str(data), "--official", "sgraf",
            "--vocab", str(data / "vocab.json"), "--json", str(tmp_path / "r.json"), "--quiet"]
    for dtype in ("fp32", "bf16"):
        assert main([*args, "--similarity-dtype", dtype, "--save-sims", str(tmp_path / dtype)]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["full"]["rsum"] >= 0
    fp32, bf16 = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "bf16.npy")
    assert not np.array_equal(fp32, bf16)  # bf16 did reach the similarity ops
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)
    assert "--official needs --vocab" in _fails(args[:6], capsys)


@pytest.mark.parametrize("instructions", [None, "avx512_bf16"])
def test_eval_in_bf16_says_when_the_cpu_makes_it_slow(data, tmp_path, capsys, monkeypatch, instructions):
    from sgfused import _backend
    from sgfused.data.vocab import Vocabulary
    from sgfused.models import build_model

    vocab = Vocabulary.load(data / "vocab.json")
    build_model("sgraf", len(vocab), dict(img_dim=16, embed_size=16, word_dim=8, sim_dim=8)).to_official(
        tmp_path / "model_best.pth.tar")
    monkeypatch.setattr(_backend, "cpu_bf16_dot", lambda: instructions)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "model_best.pth.tar"), "--data", str(data), "--official", "sgraf",
                 "--vocab", str(data / "vocab.json"), "--device", "cpu", "--similarity-dtype", "bf16"]) == 0
    note = "this CPU has no bf16 dot instructions (avx512_bf16 or AMX), so --similarity-dtype bf16 runs slower"
    assert (note in capsys.readouterr().err) == (instructions is None)


def _options(parser):
    """(command path, action) of every option of every subcommand, walking the subparsers."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for path, option in _options(sub):
                    yield (name, *path), option
        elif action.option_strings:
            yield (), action


def test_help_states_every_options_default():
    """README: every command has --help, with each option's default (a flag, or an option without one, says nothing)."""
    import argparse

    from sgfused.cli import build_parser

    checked = 0
    for path, action in _options(build_parser()):
        if action.default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        default = " ".join(action.default) if isinstance(action.default, list) else str(action.default)
        help_text = action.help or ""
        assert "default" in help_text and default in help_text, (path, action.option_strings, help_text)
        checked += 1
    assert checked >= 15  # the walk reached the subcommands' options


def test_usage_errors_are_one_line(tmp_path, capsys):
    """argparse's own errors (a value of the wrong type, an unknown flag) are one line too, status 2."""
    for argv, needles in ((["train", "--data", str(tmp_path), "--epochs", "abc"], ("--epochs", "'abc'")),
                          (["eval", "x.pt", "--data", str(tmp_path), "--nope"], ("--nope",))):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("sgfused") and ": error: " in err, err
        assert all(needle in err for needle in needles), err


def test_an_unreadable_file_is_one_line(tmp_path, capsys, monkeypatch):
    """A config file that cannot be read (permission denied) is a user error, not a traceback."""
    from pathlib import Path

    config = tmp_path / "recipe.json"
    config.write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert "Permission denied" in _fails(["train", "--data", str(tmp_path), "--config", str(config)], capsys)


def test_a_missing_spacy_pipeline_is_one_line(data, tmp_path, capsys):
    copy = tmp_path / "d"
    copy.mkdir()
    (copy / "test_caps.txt").write_text((data / "test_caps.txt").read_text())
    err = _fails(["data", "parse", "--data", str(copy), "--split", "test", "--pipeline", "no_such_pipeline_xyz"], capsys)
    assert err.count("\n") == 1 and ("no_such_pipeline_xyz" in err or "needs spaCy" in err), err


@pytest.mark.parametrize("flags, message", [
    (["--twin-fraction", "0.7"], "--twin-fraction must be in [0, 0.5], got 0.7"),
    (["--feature-dim", "0"], "--feature-dim must be >= 1, got 0"),
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**32-1, got -1"),
])
def test_synth_names_the_flag_out_of_range(flags, message, tmp_path, capsys):
    argv = ["data", "synth", "--out", str(tmp_path / "d"), "--images", "10", *flags, "--quiet"]
    assert message in _fails(argv, capsys)
    assert not (tmp_path / "d").exists()


def test_synth_keeps_the_same_dataset_and_refuses_to_overwrite_another(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["data", "synth", "--out", str(out), "--images", "20", "--seed", "3", "--feature-dim", "8", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 0  # the same dataset again: kept, not rewritten (a second demo run)
    assert "already holds this synthetic dataset" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    other = [*argv[:7], "4", *argv[8:]]  # another seed
    assert "pass --overwrite" in _fails(other, capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert main([*other, "--overwrite"]) == 0 and json.loads((out / "world.json").read_text())["seed"] == 4
    foreign = tmp_path / "released"
    foreign.mkdir()
    (foreign / "train_caps.txt").write_text("keep me\n")
    assert "pass --overwrite" in _fails(["data", "synth", "--out", str(foreign), "--images", "10", "--quiet"], capsys)
    assert (foreign / "train_caps.txt").read_text() == "keep me\n" and sorted(foreign.iterdir()) == [foreign / "train_caps.txt"]


def test_vocab_counts_train_and_dev_at_threshold_4_and_keeps_an_existing_file(tmp_path, capsys):
    """README: `data vocab` builds vocab.json from the train + dev captions, words seen >= 4 times by default."""
    from sgfused.data.vocab import Vocabulary

    (tmp_path / "train_caps.txt").write_text("a kite\n" * 3 + "a boat\n" * 2)
    (tmp_path / "dev_caps.txt").write_text("a kite\n" + "a boat\n")
    (tmp_path / "test_caps.txt").write_text("a zebra\n" * 9)
    assert main(["data", "vocab", "--data", str(tmp_path)]) == 0
    words = set(Vocabulary.load(tmp_path / "vocab.json").word2idx)
    assert {"a", "kite"} <= words and "boat" not in words and "zebra" not in words  # kite 4x, boat 3x, zebra: test only
    before = (tmp_path / "vocab.json").read_bytes()
    assert "pass --overwrite" in _fails(["data", "vocab", "--data", str(tmp_path), "--threshold", "1"], capsys)
    assert (tmp_path / "vocab.json").read_bytes() == before
    assert main(["data", "vocab", "--data", str(tmp_path), "--threshold", "1", "--overwrite"]) == 0
    assert "boat" in Vocabulary.load(tmp_path / "vocab.json").word2idx


def test_a_device_this_machine_lacks_is_one_line(data, checkpoint, capsys, monkeypatch):
    if not torch.backends.mps.is_available():
        assert "MPS is not available here" in _fails(["eval", str(checkpoint), "--data", str(data), "--device", "mps"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _fails(["eval", str(checkpoint), "--data", str(data), "--device", "cuda:3"], capsys)
    assert "--device is 'cuda:3' but only 1 CUDA devices are visible" in err
