"""Attach fake kernels and autograd to an op's forward/backward operator pair (compiled and Triton)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_forward_backward(
    name: str,
    fake_forward: Callable,
    fake_backward: Callable,
    make_backward: Callable[[Callable], Callable],
    setup_context: Callable,
) -> None:
    """For ``sgfused::<name>_forward`` and ``..._forward_triton``: fake kernels and autograd.

    ``make_backward(backward_op)`` returns the autograd backward that calls the
    matching ``sgfused::<name>_backward[_triton]`` operator.
    """
    for suffix in ("", "_triton"):
        forward, backward = f"sgfused::{name}_forward{suffix}", f"sgfused::{name}_backward{suffix}"
        torch.library.register_fake(forward)(fake_forward)
        torch.library.register_fake(backward)(fake_backward)
        backward_op = getattr(torch.ops.sgfused, f"{name}_backward{suffix}")
        torch.library.register_autograd(forward, make_backward(backward_op), setup_context=setup_context)
