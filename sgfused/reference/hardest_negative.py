"""Ground truth for in-batch hardest-negative mining (docs/hardest_negative_contract.md), in plain PyTorch.

Readable and exact, not fast: it builds (Ni, Nc) masks and, for the sum of
hinges, an (n_positive, N) table. Every kernel backend is tested against it, and
autograd through it defines the gradients they must reproduce (the subgradient
goes to the lowest-index maximum, as ``torch.argmax`` picks it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _hardest(masked: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Max over ``dim`` of a -inf-masked matrix with the lowest-index argmax; -1 where all are masked."""
    index = masked.argmax(dim=dim)
    value = masked.gather(dim, index.unsqueeze(dim)).squeeze(dim)
    index = torch.where(torch.isneginf(value), torch.full_like(index, -1), index)
    return value, index


def hardest_negative_terms(
    scores: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-caption loss terms and hardest-negative indices.

    Returns ``(per_caption (Nc,) float32 (float64 for float64 input), hard_cap (Ni,) int64, hard_img (Nc,) int64)``:
    ``per_caption[c]`` is the sum over the positive images ``i`` of caption ``c`` of
    ``cost_cap(i, c) + cost_img(i, c)``; ``hard_cap[i]`` the highest-scoring negative
    caption of image ``i`` and ``hard_img[c]`` the highest-scoring negative image of
    caption ``c`` (-1 where there is none).
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    positive = img_ids[:, None] == cap_img_ids[None, :]
    negative = ~positive
    masked = s.masked_fill(positive, float("-inf"))
    row_max, hard_cap = _hardest(masked, 1)
    col_max, hard_img = _hardest(masked, 0)

    pos_i, pos_c = positive.nonzero(as_tuple=True)
    s_pos = s[pos_i, pos_c]
    if max_violation:
        cost_cap = torch.relu(margin - s_pos + row_max[pos_i])
        cost_img = torch.relu(margin - s_pos + col_max[pos_c])
    else:
        hinge_cap = torch.relu(margin - s_pos[:, None] + s[pos_i, :])
        hinge_img = torch.relu(margin - s_pos[:, None] + s[:, pos_c].t())
        cost_cap = (hinge_cap * negative[pos_i, :]).sum(1)
        cost_img = (hinge_img * negative[:, pos_c].t()).sum(1)
    per_caption = torch.zeros(s.shape[1], dtype=s.dtype, device=s.device)
    per_caption = per_caption.index_add(0, pos_c, cost_cap + cost_img)
    return per_caption, hard_cap, hard_img


def hardest_negative_embed_terms(
    img: Tensor, cap: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Same as :func:`hardest_negative_terms` with ``scores = img @ cap^T`` (fp32, fp64 for fp64 input)."""
    dtype = torch.promote_types(img.dtype, torch.float32)
    return hardest_negative_terms(img.to(dtype) @ cap.to(dtype).t(), img_ids, cap_img_ids, margin, max_violation)


def vsepp_contrastive_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """The VSE++ ``ContrastiveLoss`` on a square score matrix with diagonal positives, as published.

    Kept as the baseline the benchmarks compare against: it allocates several
    N x N temporaries (the cost matrices, the mask and their gradients).
    """
    diagonal = scores.diag().view(scores.size(0), 1)
    d1 = diagonal.expand_as(scores)
    d2 = diagonal.t().expand_as(scores)
    cost_s = (margin + scores - d1).clamp(min=0)
    cost_im = (margin + scores - d2).clamp(min=0)
    mask = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(mask, 0)
    cost_im = cost_im.masked_fill(mask, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()
