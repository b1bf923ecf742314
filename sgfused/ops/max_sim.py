"""Late-interaction max-mean score for all (image, caption) pairs: SGM Eq. 6-7, docs/max_sim_contract.md.

Every caption node is matched with its most similar image node, and the
caption's score is the mean of those maxima:
``S[a, b] = (1 / y_lens[b]) * sum_{t < y_lens[b]} max_{o < x_lens[a]} <y[b, t], x[a, o]>``.
The kernels never build the ``(Nx, Ny, Ly, Lx)`` table of node dot products;
the backward is the subgradient at the argmax node (lowest index among ties),
which the forward hands over as ``indices``.

This module is the worked example of docs/adding_an_op.md: input checks, backend
choice, the Triton operators as ``torch.library.custom_op``, fake kernels and
autograd for whichever operator pairs exist (compiled ones come from
``csrc/ops.cpp`` when the extension declares them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from .._backend import choose_backend
from ..reference.max_sim import valid_mask
from ._checks import check_nonempty, check_same_device, check_size, check_tensor, checked_finite, checked_lengths
from ._registration import has_kernel, register_forward_backward

Lengths = Tensor | Sequence[int] | None


def _checked_lengths(x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor) -> tuple[Tensor, Tensor]:
    """The raw Triton operators check lengths with the same C++ code as the compiled ones."""
    return (
        torch.ops.sgfused.checked_lengths(x_lens, x.shape[0], x.shape[1], "x_lens"),
        torch.ops.sgfused.checked_lengths(y_lens, y.shape[0], y.shape[1], "y_lens"),
    )


# ---------------------------------------------------------------- Triton as custom ops
@torch.library.custom_op("sgfused::max_sim_forward_triton", mutates_args=())
def _triton_forward(x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor, with_indices: bool) -> tuple[Tensor, Tensor]:
    from ..triton import max_sim as kernels

    x_lens, y_lens = _checked_lengths(x, y, x_lens, y_lens)
    return kernels.forward(x, y, x_lens, y_lens, with_indices)


@torch.library.custom_op("sgfused::max_sim_backward_triton", mutates_args=())
def _triton_backward(
    grad_scores: Tensor, x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor, indices: Tensor
) -> tuple[Tensor, Tensor]:
    from ..triton import max_sim as kernels

    x_lens, y_lens = _checked_lengths(x, y, x_lens, y_lens)
    return kernels.backward(grad_scores, x, y, x_lens, y_lens, indices)


# ---------------------------------------------------------------- fake kernels
def _fake_forward(x, y, x_lens, y_lens, with_indices):
    scores = x.new_empty((x.shape[0], y.shape[0]), dtype=torch.promote_types(x.dtype, torch.float32))
    index_shape = (x.shape[0], y.shape[0], y.shape[1]) if with_indices else (0,)
    return scores, x.new_empty(index_shape, dtype=torch.long)


def _fake_backward(grad_scores, x, y, x_lens, y_lens, indices):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(y, memory_format=torch.contiguous_format),
    )


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    x, y, x_lens, y_lens, _with_indices = inputs
    _, indices = output
    ctx.save_for_backward(x, y, x_lens, y_lens, indices)


def _backward_via(backward_op):
    # The forward of the same variant, to recover the argmax when it was called without indices.
    forward_name = backward_op._qualified_op_name.split("::")[1].replace("_backward", "_forward")
    forward_op = getattr(torch.ops.sgfused, forward_name)

    def backward(ctx, grad_scores, _grad_indices):
        x, y, x_lens, y_lens, indices = ctx.saved_tensors
        if indices.dim() != 3:  # the forward ran with with_indices=False (a direct operator call)
            indices = forward_op(x, y, x_lens, y_lens, True)[1]
        grad_x, grad_y = backward_op(grad_scores.contiguous(), x, y, x_lens, y_lens, indices)
        return grad_x, grad_y, None, None, None

    return backward


def register() -> None:
    """Attach fake kernels and autograd to the compiled and Triton operators (called once at import)."""
    register_forward_backward("max_sim", _fake_forward, _fake_backward, _backward_via, _setup_context)


# ---------------------------------------------------------------- backends
def _implementations() -> dict:
    """The backends max_sim has in this installation: the reference always, the others where they exist."""
    found = {"reference": reference.max_sim}
    for device_type in ("cpu", "cuda"):
        if has_kernel("sgfused::max_sim_forward", device_type) and has_kernel("sgfused::max_sim_backward", device_type):
            found[device_type] = lambda *args: torch.ops.sgfused.max_sim_forward(*args)
    if importlib.util.find_spec("sgfused.triton.max_sim") is not None:
        found["triton"] = lambda *args: torch.ops.sgfused.max_sim_forward_triton(*args)
    return found


_IMPLEMENTATIONS = _implementations()  # at import, so torch.compile traces the choice as plain Python


# ---------------------------------------------------------------- checks
def _checked_finite_nodes(name: str, nodes: Tensor, lens: Tensor) -> Tensor:
    """``lens`` (copied) once no valid node holds NaN / +-inf; else ValueError naming the first (set, node).

    Padded nodes may hold anything. One max and one min over ``d`` give an ``(N, L)``
    table that is non-finite exactly where a node is; the check runs as the
    ``sgfused::check_finite`` operator, so it holds under torch.compile too.
    """
    node_max, node_min = nodes.detach().amax(dim=-1), nodes.detach().amin(dim=-1)
    extreme = torch.where(torch.isfinite(node_max), node_min, node_max)
    return checked_finite(name, torch.where(valid_mask(lens, nodes.shape[1]), extreme, 0), lens)


# ---------------------------------------------------------------- public API
def max_sim(
    x: Tensor,
    y: Tensor,
    x_lens: Lengths = None,
    y_lens: Lengths = None,
    *,
    return_indices: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Max-mean late-interaction score of every image with every caption (SGM Eq. 6-7).

    Args:
        x: ``(Nx, Lx, d)`` image nodes (e.g. SGM's object or relation nodes of Nx images).
        y: ``(Ny, Ly, d)`` caption nodes (word or relation-phrase nodes), same dtype as ``x``.
        x_lens, y_lens: ``(Nx,)`` / ``(Ny,)`` valid lengths in ``[1, L]``, integer
            tensors or lists of ints (default: full). Padded nodes never influence a
            result, whatever they hold, and get zero gradient.
        return_indices: also return the argmax image node of every caption node,
            ``(Nx, Ny, Ly)`` int64 (lowest index among ties, -1 at padded caption nodes).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(Nx, Ny)`` scores, float32 for fp16 / bf16 / fp32 input (fp32 accumulation),
        float64 for fp64; with ``return_indices``, ``(scores, indices)``. Gradients
        flow to ``x`` and ``y`` in their dtype (the subgradient at the argmax).

    Raises ``ValueError`` for lengths outside ``[1, L]`` and for NaN / +-inf at a valid
    node (its (set, node) position is named), in eager mode and under torch.compile alike.
    """
    check_tensor("x", x, 3)
    check_tensor("y", y, 3)
    check_nonempty("x", x)
    check_nonempty("y", y)
    check_size("y", y, 2, x.shape[2], "d, the feature size of x")
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    check_same_device(
        x=x, y=y, x_lens=x_lens if isinstance(x_lens, Tensor) else None, y_lens=y_lens if isinstance(y_lens, Tensor) else None
    )
    x_lens = checked_lengths("x_lens", x_lens, x.shape[0], x.shape[1], x.device)
    y_lens = checked_lengths("y_lens", y_lens, y.shape[0], y.shape[1], x.device)
    x_lens = _checked_finite_nodes("x", x, x_lens)
    y_lens = _checked_finite_nodes("y", y, y_lens)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    args = (x.contiguous(), y.contiguous(), x_lens, y_lens, bool(return_indices) or needs_grad)
    scores, indices = _IMPLEMENTATIONS[choose_backend("max_sim", backend, x.device, _IMPLEMENTATIONS, args)](*args)
    return (scores, indices) if return_indices else scores
