"""Checkpoints: written atomically, self-describing, loadable without the training code.

A checkpoint carries everything needed to rebuild and evaluate the model (its
registry name, its config, the vocabulary) and, for ``last.pt``, everything
needed to resume training exactly (optimizer, scheduler, position in the
epoch, random-number states). Only plain containers, numbers, strings and
tensors are stored, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._files import atomic_write
from .data.vocab import Vocabulary
from .model_options import build_checked_model
from .models import RetrievalModel, model_class
from .models.state_versions import config_trained_with

FORMAT = "sgfused-checkpoint-1"
REQUIRED_KEYS = ("model_name", "model_config", "vocab", "model")  # what every checkpoint needs to rebuild its model


class CheckpointError(ValueError):
    """A file that is not an sgfused checkpoint, or one that does not match the data it is used with."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: pass {path / 'best.pt'} or {path / 'last.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no central directory
        raise CheckpointError(
            f"{path} is not a readable sgfused checkpoint: {path.stat().st_size} bytes that are not a complete "
            "torch archive (truncated, e.g. by a full disk or an interrupted copy, or not a checkpoint)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} is not an sgfused checkpoint: {unpickling_refusal(error)}") from error
    except Exception as error:  # a corrupt archive
        raise CheckpointError(f"{path} is not a readable sgfused checkpoint ({_first_line(error)})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an sgfused checkpoint (expected format {FORMAT!r}); "
            "checkpoints of the papers' own code load with the model's from_official()"
        )
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unpickling_refusal(error: pickle.UnpicklingError) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused: which object it would have had to build."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    reason = f"{found.group(1)} is not allowed" if found else _first_line(error)
    return f"it holds an object that is not a tensor or a plain container, so it was not loaded (unpickling runs code): {reason}"


def checkpoint_model_config(state: dict[str, Any]) -> dict[str, Any]:
    """The options the checkpoint's model was built with: its stored config, plus the defaults of its version.

    An option the config leaves out gets the default of the weights' state-dict
    version where the model has changed that default since (``former_defaults``,
    :mod:`sgfused.models.state_versions`), so an old checkpoint scores as it was trained.
    """
    return config_trained_with(model_class(state["model_name"]), state["model_config"], state["model"])


def model_from_checkpoint(state: dict[str, Any], source: str = "the checkpoint") -> tuple[RetrievalModel, Vocabulary]:
    """The model (in eval mode, weights loaded) and vocabulary a checkpoint was trained with.

    An edited checkpoint (options the model cannot be built with, weights that
    do not fit it) is a :class:`CheckpointError` naming the file.
    """
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{source} is an incomplete sgfused checkpoint: it lacks {missing}")
    vocab = Vocabulary.from_dict(state["vocab"], source)
    try:
        model = build_checked_model(state["model_name"], len(vocab), checkpoint_model_config(state))
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as error:
        problems = [part.strip() for line in str(error).splitlines()[1:] for part in line.split(". ") if part.strip()]
        reason = f"{problems[0].rstrip('.')} (and {len(problems) - 1} more)" if problems else _first_line(error)
        raise CheckpointError(
            f"{source}: the weights do not fit a {state['model_name']!r} model with config {state['model_config']} "
            f"(edited or damaged?): {reason}"
        ) from error
    model.set_vocabulary(vocab)
    return model.eval(), vocab


def check_same_vocabulary(checkpoint_vocab: Vocabulary, data_vocab: Vocabulary, where: str) -> None:
    """Refuse to pair a model with a vocabulary other than the one it was trained on (ids would mean other words)."""
    if checkpoint_vocab.word2idx != data_vocab.word2idx:
        raise CheckpointError(
            f"vocabulary mismatch: the checkpoint was trained with {len(checkpoint_vocab)} words, {where} has "
            f"{len(data_vocab)} words or a different word order; use the checkpoint's own vocabulary"
        )
