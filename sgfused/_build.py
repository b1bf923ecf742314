"""Loads the compiled extension ``sgfused._C`` and reports what it was built with.

Importing ``sgfused._C`` registers the C++ (and, when compiled, CUDA) kernels with
``torch.library``. A build made against another torch version is refused with a
message that says how to rebuild, instead of failing later with an obscure symbol
or ABI error.
"""

from __future__ import annotations

import functools
import json

import torch

REBUILD_HINT = (
    "Rebuild sgfused against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps ."
)


class BuildMismatch(ImportError):
    """The compiled extension does not match the installed torch."""


def check_torch_version(built_against: str, installed: str) -> None:
    """Raise :class:`BuildMismatch` unless the extension was built for the installed torch."""
    if built_against != installed:
        raise BuildMismatch(
            f"sgfused was compiled against torch {built_against} but torch {installed} is installed. "
            + REBUILD_HINT
        )


def _load_extension():
    try:
        from . import _C
    except ImportError as error:
        raise BuildMismatch(
            f"sgfused's compiled extension sgfused._C cannot be loaded with torch {torch.__version__} "
            f"({error}). If sgfused was built for another torch, or not built at all: " + REBUILD_HINT
            + " If you are inside the source checkout, its uncompiled sgfused/ shadows the installed "
            "package: run from another directory, or build in place (python setup.py build_ext --inplace)."
        ) from error
    return _C


@functools.cache
def build_info() -> dict:
    """What this installation compiled.

    Returns a dict with ``backends`` (compiled kernel backends, e.g. ``["cpu", "cuda"]``),
    ``cuda_arch_list`` (the ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels were built for),
    ``torch_version`` (the torch the extension was built against), ``openmp``
    (whether the CPU kernels run in parallel) and ``triton`` (whether the Triton
    backend can be imported).
    """
    from ._backend import TRITON_AVAILABLE

    info = json.loads(_load_extension().build_info_json())
    info["triton"] = TRITON_AVAILABLE
    return info


COMPILED_BACKENDS: frozenset[str] = frozenset()


def load() -> None:
    """Load the extension (registering its ops) and check it matches the installed torch."""
    global COMPILED_BACKENDS
    info = build_info()
    check_torch_version(info["torch_version"], torch.__version__)
    COMPILED_BACKENDS = frozenset(info["backends"])
