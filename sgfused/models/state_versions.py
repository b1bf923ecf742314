"""State-dict versions: refusing weights of an incompatible architecture, and the defaults a version was trained with.

A model whose computation changed in a way its parameter names do not show (same
tensors, other meaning) sets the class attribute ``_version`` (PyTorch's own
state-dict version, stored in a state dict's ``_metadata`` and kept by
:func:`torch.save`) and ``oldest_state_version``, the oldest it can still load;
``RetrievalModel._load_from_state_dict`` calls :func:`check_state_version`, so an
old checkpoint fails with one line that says why, instead of loading into weights
it was not trained for. A plain dict without metadata is taken as current.

A checkpoint stores the options its model was built with as the user gave them, so
an option left at its default takes whatever the default is when the checkpoint is
loaded. When a model changes a default, it bumps ``_version`` and records the old
default in ``former_defaults``; :func:`config_trained_with` gives an older checkpoint
back the default it was trained with (without that, its scores would change silently).
"""

from __future__ import annotations

from typing import Any


def check_state_version(model_name: str, local_metadata: dict[str, Any], oldest: int, change: str) -> None:
    """Raise ``ValueError`` when the state dict's recorded version of ``model_name`` is older than ``oldest``."""
    found = local_metadata.get("version")
    if found is not None and found < oldest:
        raise ValueError(f"this {model_name} state dict is version {found}, the oldest this code can use is version "
                         f"{oldest} ({change}); its weights cannot be used with this code: retrain the model")


def state_dict_version(state_dict: Any) -> int | None:
    """The root module's version recorded in a state dict (None for a plain dict without metadata)."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    return metadata.get("", {}).get("version")


def config_trained_with(model_cls: type, config: dict[str, Any], state_dict: Any) -> dict[str, Any]:
    """``config`` plus, for each option it lacks whose default changed after the state dict's version, the old default.

    ``model_cls.former_defaults`` maps an option to ``(version, default before it)``:
    the state-dict version that introduced the current default, and the value
    models of earlier versions were built with.
    """
    found = state_dict_version(state_dict)
    if found is None or not isinstance(config, dict):
        return config  # current, or not a mapping at all (which the options check reports)
    former = {key: old for key, (since, old) in model_cls.former_defaults.items()
              if key not in config and found < since}
    return {**config, **former}
