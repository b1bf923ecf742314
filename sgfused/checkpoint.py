"""Checkpoints: written atomically, self-describing, loadable without the training code.

A checkpoint carries everything needed to rebuild and evaluate the model (its
registry name, its config, the vocabulary) and, for ``last.pt``, everything
needed to resume training exactly (optimizer, scheduler, position in the
epoch, random-number states). Only plain containers, numbers, strings and
tensors are stored, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._files import atomic_write
from .data.vocab import Vocabulary
from .models import RetrievalModel, build_model

FORMAT = "sgfused-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is not an sgfused checkpoint, or one that does not match the data it is used with."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated, foreign or corrupt file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable sgfused checkpoint ({first_line})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an sgfused checkpoint (expected format {FORMAT!r}); "
            "checkpoints of the papers' own code load with the model's from_official()"
        )
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[RetrievalModel, Vocabulary]:
    """The model (in eval mode, weights loaded) and vocabulary a checkpoint was trained with."""
    vocab = Vocabulary.from_dict(state["vocab"])
    model = build_model(state["model_name"], len(vocab), state["model_config"])
    model.load_state_dict(state["model"])
    model.set_vocabulary(vocab)
    return model.eval(), vocab


def check_same_vocabulary(checkpoint_vocab: Vocabulary, data_vocab: Vocabulary, where: str) -> None:
    """Refuse to pair a model with a vocabulary other than the one it was trained on (ids would mean other words)."""
    if checkpoint_vocab.word2idx != data_vocab.word2idx:
        raise CheckpointError(
            f"vocabulary mismatch: the checkpoint was trained with {len(checkpoint_vocab)} words, {where} has "
            f"{len(data_vocab)} words or a different word order; use the checkpoint's own vocabulary"
        )
