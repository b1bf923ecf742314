"""Model options from a user (``--set``, a config file, a checkpoint) checked before a model is built.

A model's options are the keyword arguments of its constructor; their defaults
say the type each one takes (an int default takes an int, a bool default takes
true / false, ...). Checking them here turns a wrong value into one line that
names the option, instead of a traceback from deep inside torch (``--set
embed_size=abc`` failed in ``torch.empty``, ``bi_gru=maybe`` in the GRU kernel).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from .models import RetrievalModel, build_model, model_class


class ModelOptionError(ValueError):
    """A model option of the wrong type, or a set of options the model cannot be built with."""


def model_defaults(name: str) -> dict[str, Any]:
    """Every option of model ``name`` with its default value."""
    cls = model_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {key: params[key].default for key in cls.config_keys()}


def _type_problem(value: Any, default: Any) -> str | None:
    """What is wrong with ``value`` for an option whose default is ``default``; None when it fits."""
    if default is None or default is inspect.Parameter.empty:
        return None  # no default type to go by (e.g. an optional path)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be finite"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None


def check_model_options(name: str, options: Any) -> None:
    """Refuse options that are not a mapping, unknown option names and values of the wrong type."""
    if not isinstance(options, dict):
        raise ModelOptionError(f"model options must be a JSON object of name: value, got {type(options).__name__} {options!r}")
    defaults = model_defaults(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ModelOptionError(f"model {name!r} got unknown config keys {unknown}; accepted: {sorted(defaults)}")
    for key, value in options.items():
        problem = _type_problem(value, defaults[key])
        if problem:
            raise ModelOptionError(
                f"model option {key} {problem} (default {defaults[key]!r}), got {value!r}"
            )


def effective_model_config(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every default filled in: two configs that build the same model compare equal."""
    return {**model_defaults(name), **options}


def build_checked_model(name: str, vocab_size: int, options: Any) -> RetrievalModel:
    """:func:`~sgfused.models.build_model` after :func:`check_model_options`.

    A constructor that still refuses the values (say ``embed_size=0``, which
    torch's GRU reports as "hidden_size must be greater than zero") is reported
    with the options as given, so the message names what the user wrote.
    """
    check_model_options(name, options)
    try:
        return build_model(name, vocab_size, options)
    except (ValueError, TypeError, RuntimeError) as error:
        given = ", ".join(f"{key}={value!r}" for key, value in options.items()) or "the defaults"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelOptionError(f"model {name!r} cannot be built with {given}: {reason}") from error
