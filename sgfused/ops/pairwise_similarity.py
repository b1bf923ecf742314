"""All-pairs learned vector similarity (SGRAF / MPSM global alignment), docs/pairwise_similarity_contract.md.

``out[i, j] = l2norm(W e(x_i, y_j) + b)`` with ``e = (x - y)^2`` ("distance") or
``l2norm(x) * l2norm(y)`` ("direction"). The naive computation builds an
``(Nx, Ny, d)`` tensor (1000 images x 5000 captions x 1024 floats is 20 GB); the
fused kernels contract a block of pairs at a time and never hold it whole.

Numerics. ``W (x - y)^2`` expands to ``W x^2 + W y^2 - 2 W (x * y)``, which cancels
catastrophically when ``x`` is close to ``y``. The C++ CPU kernel avoids the
expansion altogether (it forms ``x - y`` per block); every kernel accumulates in
fp32 (fp64 for fp64 input), and the l2 normalisation divides by ``||z|| + eps``,
so a zero vector maps to zero rather than NaN. Near-equal inputs are tested.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import choose_backend
from ._checks import check_nonempty, check_option, check_same_device, check_size, check_tensor
from ._registration import register_forward_backward

MODES = ("distance", "direction")


@torch.library.custom_op("sgfused::pairwise_similarity_forward_triton", mutates_args=())
def _triton_forward(
    x: Tensor, y: Tensor, weight: Tensor, bias: Optional[Tensor], mode: str, eps: float, aligned: bool
) -> tuple[Tensor, Tensor]:
    from ..triton import pairwise_similarity as kernels

    return kernels.forward(x, y, weight, bias, mode, eps, aligned)


@torch.library.custom_op("sgfused::pairwise_similarity_backward_triton", mutates_args=())
def _triton_backward(
    grad_out: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    norm: Tensor,
    mode: str,
    eps: float,
    aligned: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton import pairwise_similarity as kernels

    return kernels.backward(grad_out, x, y, weight, bias, out, norm, mode, eps, aligned)


def _fake_forward(x, y, weight, bias, mode, eps, aligned):
    pairs = (x.shape[0],) if aligned else (x.shape[0], y.shape[0])
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(*pairs, weight.shape[0]), x.new_empty(pairs, dtype=acc)


def _fake_backward(grad_out, x, y, weight, bias, out, norm, mode, eps, aligned):
    grad_bias = x.new_empty(weight.shape[0] if bias is not None else 0)
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output) -> None:
    x, y, weight, bias, mode, eps, aligned = inputs
    out, norm = output
    ctx.save_for_backward(x, y, weight, bias, out, norm)
    ctx.options = (mode, eps, aligned)


def _backward_via(backward_op):
    def backward(ctx, grad_out, _grad_norm):
        x, y, weight, bias, out, norm = ctx.saved_tensors
        grad_x, grad_y, grad_weight, grad_bias = backward_op(
            grad_out.contiguous(), x, y, weight, bias, out, norm, *ctx.options
        )
        return grad_x, grad_y, grad_weight, (grad_bias if bias is not None else None), None, None, None

    return backward


def register() -> None:
    """Attach fake kernels and autograd to the compiled and Triton operators (called once at import)."""
    register_forward_backward("pairwise_similarity", _fake_forward, _fake_backward, _backward_via, _setup_context)


def _reference(x, y, weight, bias, mode, eps, aligned):
    return reference.pairwise_similarity(x, y, weight, bias, mode, eps, aligned)


_IMPLEMENTATIONS = {
    "reference": _reference,
    "cpu": lambda *args: torch.ops.sgfused.pairwise_similarity_forward(*args)[0],
    "cuda": lambda *args: torch.ops.sgfused.pairwise_similarity_forward(*args)[0],
    "triton": lambda *args: torch.ops.sgfused.pairwise_similarity_forward_triton(*args)[0],
}


def pairwise_similarity(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    mode: str = "distance",
    eps: float = 1e-8,
    *,
    aligned: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Learned similarity vector of every (x_i, y_j) pair.

    Args:
        x: ``(Nx, d)``, e.g. global image features.
        y: ``(Ny, d)``, e.g. global caption features.
        weight: ``(m, d)``, the similarity projection W (SGRAF ``sim_tranglo_w``).
        bias: ``(m,)`` or None.
        mode: ``"distance"``: ``l2norm(W (x_i - y_j)^2 + b)`` (SGRAF, MPSM "distance");
            ``"direction"``: ``l2norm(W (l2norm(x_i) * l2norm(y_j)) + b)`` (MPSM "direction").
        eps: added to every norm (``v / (||v|| + eps)``), in ``[0, 1]`` (0 is exact but
            gives NaN for a zero vector).
        aligned: pair ``x_i`` with ``y_i`` only (``Nx == Ny``), for training code that
            already has matched pairs; same kernels.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(Nx, Ny, m)`` (``(N, m)`` when ``aligned``) in the dtype of ``x``; fp32
        accumulation inside. Differentiable in x, y, weight and bias.
    """
    check_tensor("x", x, 2)
    check_tensor("y", y, 2)
    check_tensor("weight", weight, 2)
    for name, t in (("x", x), ("y", y), ("weight", weight)):
        check_nonempty(name, t)
    check_size("y", y, 1, x.shape[1], "d, the feature size of x")
    check_size("weight", weight, 1, x.shape[1], "d, the feature size of x")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_size("bias", bias, 0, weight.shape[0], "m, the rows of weight")
    for name, t in (("y", y), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    check_same_device(x=x, y=y, weight=weight, bias=bias)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if aligned and x.shape[0] != y.shape[0]:
        raise ValueError(f"aligned pairs need as many x as y rows, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    eps = check_option("eps", eps, 0.0, 1.0)
    args = (x.contiguous(), y.contiguous(), weight.contiguous(), bias, mode, eps, bool(aligned))
    return _IMPLEMENTATIONS[choose_backend("pairwise_similarity", backend, x.device, _IMPLEMENTATIONS, args)](*args)
