"""Learned vector similarity layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import pairwise_similarity


class VectorSimilarity(nn.Module):
    """``l2norm(W e(x, y) + b)``: SGRAF's ``sim_tranglo_w`` / ``sim_tranloc_w`` block, MPSM's global node.

    Holds ``W (m, d)`` and ``b (m,)``, initialised as the papers' code does
    (Xavier-uniform weight, ``r = sqrt(6 / (d + m))``, zero bias).
    ``forward(x, y)`` compares every row of ``x`` with every row of ``y``
    (``(Nx, Ny, m)``); ``all_pairs=False`` compares matched rows (``(N, m)``).
    """

    def __init__(self, d: int, m: int, mode: str = "distance", bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.mode = mode
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(m, d))
        self.bias = nn.Parameter(torch.empty(m)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        m, d = self.weight.shape
        bound = math.sqrt(6.0 / (d + m))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, y: Tensor, all_pairs: bool = True) -> Tensor:
        return pairwise_similarity(
            x, y, self.weight, self.bias, self.mode, aligned=not all_pairs, backend=self.backend
        )

    def extra_repr(self) -> str:
        m, d = self.weight.shape
        return f"d={d}, m={m}, mode={self.mode!r}, bias={self.bias is not None}"
