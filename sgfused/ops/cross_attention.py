"""Batched region-word cross-attention for all (query set, context set) pairs, docs/cross_attention_contract.md.

SCAN's attention as SGRAF and MPSM use it: every caption's words attend over
every image's regions (or the reverse), then a similarity epilogue. The published
code loops over captions in Python and materialises ``(n_image, L, d)`` tensors
per caption; here one call covers all pairs, and the fused kernels keep the
scores, attention and contexts of a block of pairs only, writing just the
epilogue's output. Backward recomputes the attention from the inputs and small
saved statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import choose_backend
from ._checks import (
    as_index_tensor,
    check_nonempty,
    check_option,
    check_same_device,
    check_size,
    check_tensor,
    checked_lengths,
)
from ._registration import register_forward_backward

NORMS = ("clipped_l2", "none")
EPILOGUES = ("context", "cosine", "distance", "direction")
# Largest softmax temperature accepted: the attention's gradient scales with smooth, and in fp32 it
# drifts from the exact one beyond about 1e4 (papers use 4 to 20); see docs/cross_attention_contract.md.
SMOOTH_MAX = 1e3
# CUDA C++ keeps a pair's clipped row norms (fp32, fp64 for fp64 inputs) in shared memory of this size
# (kMaxSharedBytes in csrc/cuda/cross_attention.cu), so it cannot serve clipped_l2 over longer contexts.
CUDA_SHARED_BYTES = 48 << 10


def cuda_refusal(contexts: Tensor, norm: str) -> dict[str, str]:
    """``{"cuda": why}`` when the CUDA C++ kernel cannot serve these contexts, else ``{}`` (auto then takes Triton)."""
    most = CUDA_SHARED_BYTES // (8 if contexts.dtype == torch.float64 else 4)
    if norm == "clipped_l2" and contexts.shape[1] > most:
        return {"cuda": f"the padded context length {contexts.shape[1]} is too long for norm=\"clipped_l2\" "
                        f"(at most {most} for {contexts.dtype})"}
    return {}


def _checked_triton_lengths(queries: Tensor, contexts: Tensor, query_lens: Tensor, context_lens: Tensor):
    """The raw Triton operators check lengths exactly as the compiled ones (one C++ check for both)."""
    return (
        torch.ops.sgfused.checked_lengths(query_lens, queries.shape[0], queries.shape[1], "query_lens"),
        torch.ops.sgfused.checked_lengths(context_lens, contexts.shape[0], contexts.shape[1], "context_lens"),
    )


@torch.library.custom_op("sgfused::cross_attention_forward_triton", mutates_args=())
def _triton_forward(
    queries: Tensor,
    contexts: Tensor,
    query_lens: Tensor,
    context_lens: Tensor,
    smooth: float,
    leaky: float,
    norm: str,
    epilogue: str,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor]:
    from ..triton import cross_attention as kernels

    query_lens, context_lens = _checked_triton_lengths(queries, contexts, query_lens, context_lens)
    return kernels.forward(queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps)


@torch.library.custom_op("sgfused::cross_attention_backward_triton", mutates_args=())
def _triton_backward(
    grad_out: Tensor,
    queries: Tensor,
    contexts: Tensor,
    query_lens: Tensor,
    context_lens: Tensor,
    smooth: float,
    leaky: float,
    norm: str,
    epilogue: str,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    out: Tensor,
    stats: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton import cross_attention as kernels

    query_lens, context_lens = _checked_triton_lengths(queries, contexts, query_lens, context_lens)
    return kernels.backward(
        grad_out, queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps, out, stats
    )


def _out_shape(queries: Tensor, contexts: Tensor, epilogue: str, weight: Tensor | None) -> tuple[int, ...]:
    pairs = (queries.shape[0], contexts.shape[0], queries.shape[1])
    if epilogue == "cosine":
        return pairs
    return (*pairs, queries.shape[2] if epilogue == "context" else weight.shape[0])


def _fake_forward(queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps):
    acc = torch.promote_types(queries.dtype, torch.float32)
    out = queries.new_empty(_out_shape(queries, contexts, epilogue, weight))
    stats = queries.new_empty((queries.shape[0], contexts.shape[0], queries.shape[1], 2), dtype=acc)
    return out, stats


def _fake_backward(grad_out, queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias,
                   eps, out, stats):
    grad_w = torch.empty_like(weight) if weight is not None else queries.new_empty(0)
    grad_b = torch.empty_like(bias) if bias is not None else queries.new_empty(0)
    return torch.empty_like(queries), torch.empty_like(contexts), grad_w, grad_b


def _setup_context(ctx, inputs, output) -> None:
    queries, contexts, query_lens, context_lens, smooth, leaky, norm, epilogue, weight, bias, eps = inputs
    out, stats = output
    ctx.save_for_backward(queries, contexts, query_lens, context_lens, weight, bias, out, stats)
    ctx.options = (smooth, leaky, norm, epilogue)
    ctx.eps = eps


def _backward_via(backward_op):
    def backward(ctx, grad_out, _grad_stats):
        queries, contexts, query_lens, context_lens, weight, bias, out, stats = ctx.saved_tensors
        grad_q, grad_c, grad_w, grad_b = backward_op(
            grad_out.contiguous(), queries, contexts, query_lens, context_lens, *ctx.options, weight, bias, ctx.eps,
            out, stats,
        )
        grad_w = grad_w if weight is not None else None
        grad_b = grad_b if bias is not None else None
        return grad_q, grad_c, None, None, None, None, None, None, grad_w, grad_b, None

    return backward


def register() -> None:
    """Attach fake kernels and autograd to the compiled and Triton operators (called once at import)."""
    register_forward_backward("cross_attention", _fake_forward, _fake_backward, _backward_via, _setup_context)


_IMPLEMENTATIONS = {
    "reference": reference.cross_attention,
    "cpu": lambda *args: torch.ops.sgfused.cross_attention_forward(*args)[0],
    "cuda": lambda *args: torch.ops.sgfused.cross_attention_forward(*args)[0],
    "triton": lambda *args: torch.ops.sgfused.cross_attention_forward_triton(*args)[0],
}


def cross_attention(
    queries: Tensor,
    contexts: Tensor,
    *,
    query_lens: Tensor | Sequence[int] | None = None,
    context_lens: Tensor | Sequence[int] | None = None,
    smooth: float = 9.0,
    leaky: float = 0.1,
    norm: str = "clipped_l2",
    epilogue: str = "context",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tensor:
    """Every query set attends over every context set (SCAN attention), then a similarity epilogue.

    Args:
        queries: ``(Nq, Lq, d)``, e.g. the word features of Nq captions (text-to-image
            attention, as in SGRAF); use region features for image-to-text.
        contexts: ``(Nc, Lc, d)``, e.g. the region features of Nc images.
        query_lens, context_lens: ``(Nq,)`` / ``(Nc,)`` valid lengths (default: full).
            Tensors or lists of ints, each in ``[1, padded length]``. Padded positions never
            influence a result or a gradient, whatever they hold (NaN, inf); padded query
            positions output 0 and get zero gradients.
        smooth: softmax temperature lambda (9 in SGRAF), in ``(0, SMOOTH_MAX]`` (1e3).
        leaky: slope of the leaky ReLU before the clipped l2 normalisation (SCAN: 0.1), in ``[0, 1]``.
        norm: ``"clipped_l2"`` (SCAN) or ``"none"``.
        epilogue: ``"context"`` -> ``(Nq, Nc, Lq, d)`` attended contexts;
            ``"cosine"`` -> ``(Nq, Nc, Lq)`` cosine of context and query;
            ``"distance"`` -> ``(Nq, Nc, Lq, m)`` ``l2norm(W (context - query)^2 + bias)`` (SGRAF);
            ``"direction"`` -> ``l2norm(W (l2norm(context) * l2norm(query)) + bias)`` (MPSM).
        weight, bias: ``(m, d)`` and ``(m,)`` for distance / direction.
        eps: added to every norm, in ``(0, 1]``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns the epilogue's output in the dtype of ``queries`` (fp32 accumulation inside).
    Bad input raises a one-line ``TypeError`` / ``ValueError`` naming the argument, in eager
    mode and under torch.compile alike.
    """
    check_tensor("queries", queries, 3)
    check_tensor("contexts", contexts, 3)
    check_nonempty("queries", queries)
    check_nonempty("contexts", contexts)
    check_size("contexts", contexts, 2, queries.shape[2], "d, the feature size of queries")
    if contexts.dtype != queries.dtype:
        raise TypeError(f"contexts must have the dtype of queries ({queries.dtype}), got {contexts.dtype}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    needs_weight = epilogue in ("distance", "direction")
    if needs_weight and weight is None:
        raise ValueError(f"epilogue {epilogue!r} needs weight (m, d)")
    if not needs_weight and (weight is not None or bias is not None):
        raise ValueError(f"epilogue {epilogue!r} takes no weight or bias")
    if weight is not None:
        check_tensor("weight", weight, 2)
        check_size("weight", weight, 1, queries.shape[2], "d, the feature size of queries")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_size("bias", bias, 0, weight.shape[0], "m, the rows of weight")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != queries.dtype:
            raise TypeError(f"{name} must have the dtype of queries ({queries.dtype}), got {t.dtype}")
    smooth = check_option("smooth", smooth, 0.0, SMOOTH_MAX, low_open=True)
    leaky = check_option("leaky", leaky, 0.0, 1.0)
    eps = check_option("eps", eps, 0.0, 1.0, low_open=True)
    query_lens = as_index_tensor("query_lens", query_lens, queries.device)
    context_lens = as_index_tensor("context_lens", context_lens, queries.device)
    check_same_device(queries=queries, contexts=contexts, query_lens=query_lens, context_lens=context_lens,
                      weight=weight, bias=bias)
    q_lens = checked_lengths("query_lens", query_lens, queries.shape[0], queries.shape[1], queries.device)
    c_lens = checked_lengths("context_lens", context_lens, contexts.shape[0], contexts.shape[1], queries.device)
    args = (queries.contiguous(), contexts.contiguous(), q_lens, c_lens, smooth, leaky, norm, epilogue,
            None if weight is None else weight.contiguous(), bias, eps)
    chosen = choose_backend("cross_attention", backend, queries.device, _IMPLEMENTATIONS, args,
                            refusals=cuda_refusal(contexts, norm))
    return _IMPLEMENTATIONS[chosen](*args)
