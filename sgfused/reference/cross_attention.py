"""Ground truth for batched region-word cross-attention over all pairs (docs/cross_attention_contract.md), in plain PyTorch.

SCAN's attention (leaky-ReLU, clipped l2 normalisation over the query words,
softmax with temperature ``smooth`` over the contexts) for every (query set,
context set) pair at once, followed by one of the similarity epilogues of SGRAF
and MPSM. Batched with einsum, no loop over captions; it materialises the
(Nq, Nc, Lc, Lq) scores and the (Nq, Nc, Lq, d) contexts, which is what the
fused kernels avoid.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .pairwise_similarity import l2norm


def valid_mask(lens: Tensor, length: int) -> Tensor:
    """``(N, length)`` bool: position < len."""
    return torch.arange(length, device=lens.device) < lens[:, None]


def cross_attention(
    queries: Tensor,
    contexts: Tensor,
    query_lens: Tensor,
    context_lens: Tensor,
    smooth: float = 9.0,
    leaky: float = 0.1,
    norm: str = "clipped_l2",
    epilogue: str = "context",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Attend every query set over every context set; see docs/cross_attention_contract.md.

    Returns ``(Nq, Nc, Lq, d)`` for ``"context"``, ``(Nq, Nc, Lq)`` for ``"cosine"`` and
    ``(Nq, Nc, Lq, m)`` for ``"distance"`` / ``"direction"``, in the input dtype, with
    zeros at padded query positions.
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=queries.device)
    # Padded positions are replaced by 0 before any arithmetic (torch.where, not a product with a
    # mask): whatever they hold (NaN, inf, 1e30) then never reaches a valid value or its gradient.
    q = torch.where(valid_mask(query_lens, queries.shape[1])[..., None], queries.to(dtype), zero)
    c = torch.where(valid_mask(context_lens, contexts.shape[1])[..., None], contexts.to(dtype), zero)
    q_valid = valid_mask(query_lens, q.shape[1])[:, None, None, :]  # (Nq, 1, 1, Lq)
    c_valid = valid_mask(context_lens, c.shape[1])[None, :, :, None]  # (1, Nc, Lc, 1)
    s = torch.einsum("bkd,ajd->abkj", c, q)  # (Nq, Nc, Lc, Lq)
    if norm == "clipped_l2":
        s = F.leaky_relu(s, leaky).masked_fill(~q_valid, 0.0)
        s = s / (torch.linalg.vector_norm(s, dim=3, keepdim=True) + eps)
    p = torch.softmax((smooth * s).masked_fill(~c_valid, float("-inf")), dim=2)
    ctx = l2norm(torch.einsum("abkj,bkd->abjd", p, c), eps)  # (Nq, Nc, Lq, d)
    qa = q[:, None]  # (Nq, 1, Lq, d)
    if epilogue == "context":
        out = ctx
    elif epilogue == "cosine":
        dots = (ctx * qa).sum(-1)
        out = dots / (torch.linalg.vector_norm(ctx, dim=-1) * torch.linalg.vector_norm(qa, dim=-1)).clamp(min=eps)
    else:
        e = (ctx - qa).pow(2) if epilogue == "distance" else l2norm(ctx, eps) * l2norm(qa, eps)
        w = weight.to(dtype)
        out = l2norm(F.linear(e, w, None if bias is None else bias.to(dtype)), eps)
    keep = valid_mask(query_lens, q.shape[1])[:, None, :]  # (Nq, 1, Lq)
    keep = keep if epilogue == "cosine" else keep[..., None]
    return torch.where(keep, out, zero).to(queries.dtype)
