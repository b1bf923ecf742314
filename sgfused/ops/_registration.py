"""Attach fake kernels and autograd to an op's forward/backward operator pairs (compiled and Triton).

An op may have a compiled pair (schemas in ``csrc/ops.cpp``: ``sgfused::<name>_forward``
/ ``_backward``), a Triton pair (``torch.library.custom_op`` in its Python module:
``..._forward_triton`` / ``..._backward_triton``), both, or neither (reference only).
Registration covers whichever pairs exist, so a Triton-only or reference-only op
needs no C++ change and no rebuild (docs/adding_an_op.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VARIANTS = ("", "_triton")  # compiled (C++ schema), Triton (Python custom op)


def has_operator(qualified_name: str) -> bool:
    """Whether ``sgfused::<name>`` has a schema (declared in C++ or by a Python custom op)."""
    namespace, name = qualified_name.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def has_kernel(qualified_name: str, device_type: str) -> bool:
    """Whether ``qualified_name`` exists and has a kernel for ``device_type`` ("cpu", "cuda")."""
    if not has_operator(qualified_name):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, key)


def register_forward_backward(
    name: str,
    fake_forward: Callable,
    fake_backward: Callable,
    make_backward: Callable[[Callable], Callable],
    setup_context: Callable,
) -> tuple[str, ...]:
    """For each existing ``sgfused::<name>_forward[_triton]`` pair: fake kernels and autograd.

    ``make_backward(backward_op)`` returns the autograd backward that calls the
    matching ``sgfused::<name>_backward[_triton]`` operator. Returns the variants
    registered (``""`` compiled, ``"_triton"`` Triton).
    """
    registered = []
    for suffix in VARIANTS:
        forward, backward = f"sgfused::{name}_forward{suffix}", f"sgfused::{name}_backward{suffix}"
        if not (has_operator(forward) and has_operator(backward)):
            continue
        torch.library.register_fake(forward)(fake_forward)
        torch.library.register_fake(backward)(fake_backward)
        backward_op = getattr(torch.ops.sgfused, f"{name}_backward{suffix}")
        torch.library.register_autograd(forward, make_backward(backward_op), setup_context=setup_context)
        registered.append(suffix)
    return tuple(registered)
