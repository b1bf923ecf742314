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

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import choose_backend
from ._checks import check_nonempty, check_same_device, check_size, check_tensor
from ._registration import register_forward_backward

NORMS = ("clipped_l2", "none")
EPILOGUES = ("context", "cosine", "distance", "direction")


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


def _lengths(name: str, lens: Tensor | None, count: int, padded: int, device: torch.device) -> Tensor:
    """Checked int64 lengths, full length when None (1 <= len <= padded; checked on the host)."""
    if lens is None:
        return torch.full((count,), padded, dtype=torch.long, device=device)
    check_tensor(name, lens, 1, floating=False)
    check_size(name, lens, 0, count, "one length per set")
    if not torch.compiler.is_compiling():
        low, high = int(lens.min()), int(lens.max())
        if low < 1 or high > padded:
            raise ValueError(f"{name} must lie in [1, {padded}] (the padded length), got values in [{low}, {high}]")
    return lens.long().contiguous()


def cross_attention(
    queries: Tensor,
    contexts: Tensor,
    *,
    query_lens: Tensor | None = None,
    context_lens: Tensor | None = None,
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
            Padded positions never influence a result; padded query positions output 0.
        smooth: softmax temperature lambda (9 in SGRAF).
        leaky: slope of the leaky ReLU before the clipped l2 normalisation (SCAN: 0.1).
        norm: ``"clipped_l2"`` (SCAN) or ``"none"``.
        epilogue: ``"context"`` -> ``(Nq, Nc, Lq, d)`` attended contexts;
            ``"cosine"`` -> ``(Nq, Nc, Lq)`` cosine of context and query;
            ``"distance"`` -> ``(Nq, Nc, Lq, m)`` ``l2norm(W (context - query)^2 + bias)`` (SGRAF);
            ``"direction"`` -> ``l2norm(W (l2norm(context) * l2norm(query)) + bias)`` (MPSM).
        weight, bias: ``(m, d)`` and ``(m,)`` for distance / direction.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns the epilogue's output in the dtype of ``queries`` (fp32 accumulation inside).
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
    check_same_device(queries=queries, contexts=contexts, query_lens=query_lens, context_lens=context_lens,
                      weight=weight, bias=bias)
    q_lens = _lengths("query_lens", query_lens, queries.shape[0], queries.shape[1], queries.device)
    c_lens = _lengths("context_lens", context_lens, contexts.shape[0], contexts.shape[1], queries.device)
    chosen = choose_backend("cross_attention", backend, queries.device, _IMPLEMENTATIONS)
    return _IMPLEMENTATIONS[chosen](
        queries.contiguous(), contexts.contiguous(), q_lens, c_lens, float(smooth), float(leaky), norm, epilogue,
        None if weight is None else weight.contiguous(), bias, float(eps),
    )
