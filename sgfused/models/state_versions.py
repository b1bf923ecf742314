"""Refusing weights written by an older, incompatible version of a model's architecture.

A model whose computation changed in a way its parameter names do not show (same
tensors, other meaning) sets the class attribute ``_version`` (PyTorch's own
state-dict version, stored in a state dict's ``_metadata`` and kept by
:func:`torch.save`). Its ``_load_from_state_dict`` calls :func:`check_state_version`,
so an old checkpoint fails with one line that says why, instead of loading into
weights it was not trained for. A plain dict without metadata is taken as current.
"""

from __future__ import annotations

from typing import Any


def check_state_version(model_name: str, local_metadata: dict[str, Any], version: int, change: str) -> None:
    """Raise ``ValueError`` when the state dict's recorded version of ``model_name`` is older than ``version``."""
    found = local_metadata.get("version", version)
    if found is not None and found < version:
        raise ValueError(f"this {model_name} state dict is version {found}, the model is version {version} "
                         f"({change}); its weights cannot be used with this code: retrain the model")
