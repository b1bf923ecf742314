"""Similarity layers: global (vector pairs), local (cross-attention) and late-interaction (max-mean) blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import cross_attention, max_sim, pairwise_similarity


def _papers_init(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """Xavier-uniform weight (r = sqrt(6 / (d + m))) and zero bias, as the SGRAF / MPSM code initialises them."""
    m, d = weight.shape
    bound = math.sqrt(6.0 / (d + m))
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.zeros_(bias)


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
        _papers_init(self.weight, self.bias)

    def forward(self, x: Tensor, y: Tensor, all_pairs: bool = True) -> Tensor:
        return pairwise_similarity(
            x, y, self.weight, self.bias, self.mode, aligned=not all_pairs, backend=self.backend
        )

    def extra_repr(self) -> str:
        m, d = self.weight.shape
        return f"d={d}, m={m}, mode={self.mode!r}, bias={self.bias is not None}"


class CrossAttentionSimilarity(nn.Module):
    """SCAN attention + learned similarity: SGRAF's local alignment block (``sim_tranloc_w``).

    ``forward(queries, contexts, query_lens, context_lens)`` attends every query
    set (e.g. caption words, ``(Nq, Lq, d)``) over every context set (e.g. image
    regions, ``(Nc, Lc, d)``) and returns ``(Nq, Nc, Lq, m)`` local similarity
    vectors, zero at padded query positions. ``epilogue`` is ``"distance"``
    (SGRAF, MPSM) or ``"direction"`` (MPSM). Same initialisation as
    :class:`VectorSimilarity`.
    """

    def __init__(
        self,
        d: int,
        m: int,
        epilogue: str = "distance",
        smooth: float = 9.0,
        leaky: float = 0.1,
        norm: str = "clipped_l2",
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if epilogue not in ("distance", "direction"):
            raise ValueError(f"epilogue must be 'distance' or 'direction', got {epilogue!r}")
        self.epilogue, self.smooth, self.leaky, self.norm, self.backend = epilogue, smooth, leaky, norm, backend
        self.weight = nn.Parameter(torch.empty(m, d))
        self.bias = nn.Parameter(torch.empty(m)) if bias else None
        _papers_init(self.weight, self.bias)

    def forward(
        self, queries: Tensor, contexts: Tensor, query_lens: Tensor | None = None, context_lens: Tensor | None = None
    ) -> Tensor:
        return cross_attention(
            queries,
            contexts,
            query_lens=query_lens,
            context_lens=context_lens,
            smooth=self.smooth,
            leaky=self.leaky,
            norm=self.norm,
            epilogue=self.epilogue,
            weight=self.weight,
            bias=self.bias,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        m, d = self.weight.shape
        return f"d={d}, m={m}, epilogue={self.epilogue!r}, smooth={self.smooth}, norm={self.norm!r}"


class MaxSim(nn.Module):
    """Late-interaction max-mean score of every image with every caption: SGM's object / relation matching.

    ``forward(x, y, x_lens, y_lens)`` takes image nodes ``(Nx, Lx, d)`` and caption
    nodes ``(Ny, Ly, d)`` and returns ``(Nx, Ny)`` scores: each caption node's best
    image node, averaged over the caption's nodes (SGM Eq. 6-7; see
    :func:`sgfused.ops.max_sim`). No parameters; ``backend`` picks the kernel.
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self, x: Tensor, y: Tensor, x_lens: Tensor | None = None, y_lens: Tensor | None = None
    ) -> Tensor:
        return max_sim(x, y, x_lens, y_lens, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
