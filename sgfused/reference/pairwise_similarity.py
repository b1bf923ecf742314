"""Ground truth for all-pairs vector similarity (docs/pairwise_similarity_contract.md), in plain PyTorch.

The naive computation the papers' code does: build the (Nx, Ny, d) tensor of
squared differences (or products of normalised vectors), apply the Linear layer,
l2-normalise. Exact and readable; memory grows as Nx * Ny * d.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2norm(v: Tensor, eps: float = 1e-8) -> Tensor:
    """``v / (||v||_2 + eps)`` over the last dimension (SCAN / SGRAF convention)."""
    return v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)


def pairwise_similarity(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, mode: str, eps: float = 1e-8, aligned: bool = False
) -> Tensor:
    """``l2norm(W e(x_i, y_j) + b)`` for every pair: ``(Nx, Ny, m)``, or ``(N, m)`` when ``aligned``.

    ``e`` is ``(x - y)^2`` for ``mode="distance"`` and ``l2norm(x) * l2norm(y)`` for
    ``mode="direction"``. Computed in fp32 (fp64 for fp64 input), returned in the input dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs, ys, w = x.to(dtype), y.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if mode == "direction":
        xs, ys = l2norm(xs, eps), l2norm(ys, eps)
    if not aligned:
        xs, ys = xs.unsqueeze(1), ys.unsqueeze(0)
    e = (xs - ys).pow(2) if mode == "distance" else xs * ys
    return l2norm(torch.nn.functional.linear(e, w, b), eps).to(x.dtype)
