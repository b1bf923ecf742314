"""Model names the command line and checkpoints use, mapped to their classes."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .base import RetrievalModel

_MODELS: dict[str, type[RetrievalModel]] = {}
M = TypeVar("M", bound=type[RetrievalModel])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a model buildable by ``name`` (``sgfused train --model NAME``)."""

    def add(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is already registered to {_MODELS[name].__name__}")
        _MODELS[name] = cls
        cls.registry_name = name
        return cls

    return add


def available_models() -> list[str]:
    return sorted(_MODELS)


def model_class(name: str) -> type[RetrievalModel]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def build_model(name: str, vocab_size: int, config: dict[str, Any] | None = None) -> RetrievalModel:
    """A new model ``name`` for a vocabulary of ``vocab_size`` words, with ``config`` overriding its defaults.

    Every model class takes ``vocab_size`` and keyword options; unknown option
    names raise a ``ValueError`` that lists the accepted ones.
    """
    cls = model_class(name)
    options = dict(config or {})
    accepted = cls.config_keys()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} got unknown config keys {unknown}; accepted: {sorted(accepted)}")
    model = cls(vocab_size=vocab_size, **options)
    model.build_config = options  # what a checkpoint stores to rebuild the same model
    return model
