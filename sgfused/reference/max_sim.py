"""Ground truth for the late-interaction max-mean score ``max_sim`` (SGM Eq. 6-7, docs/max_sim_contract.md).

For every image ``a`` and caption ``b``:
``S[a, b] = (1 / y_lens[b]) * sum_{t < y_lens[b]} max_{o < x_lens[a]} <y[b, t], x[a, o]>``.

Readable and exact, not fast: it builds the ``(Nx, B, Ly, Lx)`` table of node
dot products for a chunk of ``B`` captions at a time (so memory stays bounded
for any number of captions), masks it, and reduces. Autograd through it defines
the gradients every kernel must reproduce: the subgradient at the argmax, the
lowest index among ties (``torch.argmax`` picks the first maximum).

Padded positions never leak: they are replaced by zeros before any product, so
NaN or inf there changes neither the scores nor the gradients, and they receive
zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one chunk's (Nx, B, Ly, Lx) table: 2^25 fp32 values are 128 MiB.
CHUNK_ELEMENTS = 1 << 25


def valid_mask(lens: Tensor, padded: int) -> Tensor:
    """``(N, padded)`` bool: position ``i`` of set ``n`` is valid iff ``i < lens[n]``."""
    return torch.arange(padded, device=lens.device) < lens[:, None]


def captions_per_chunk(nx: int, lx: int, ly: int) -> int:
    """Captions whose whole (Nx, Ly, Lx) table fits in :data:`CHUNK_ELEMENTS` (at least one)."""
    return max(1, CHUNK_ELEMENTS // max(1, nx * lx * ly))


def max_sim(x: Tensor, y: Tensor, x_lens: Tensor, y_lens: Tensor, with_indices: bool) -> tuple[Tensor, Tensor]:
    """Scores ``(Nx, Ny)`` and, if ``with_indices``, the argmax node ``(Nx, Ny, Ly)`` (int64, -1 at padding).

    ``x (Nx, Lx, d)`` image nodes, ``y (Ny, Ly, d)`` caption nodes, ``x_lens (Nx,)``
    and ``y_lens (Ny,)`` int64 lengths in ``[1, L]``. Scores are fp32 (fp64 for fp64
    input), computed in that precision; without ``with_indices`` the second result
    is an empty ``(0,)`` int64 tensor.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    (nx, lx, _), (ny, ly, _) = x.shape, y.shape
    x_valid, y_valid = valid_mask(x_lens, lx), valid_mask(y_lens, ly)
    x_clean = torch.where(x_valid[..., None], x.to(acc), 0)
    y_clean = torch.where(y_valid[..., None], y.to(acc), 0)
    no_node = torch.tensor(float("-inf"), dtype=acc, device=x.device)
    scores, indices = [], []
    step = captions_per_chunk(nx, lx, ly)
    for b0 in range(0, ny, step):
        y_chunk, y_chunk_valid = y_clean[b0 : b0 + step], y_valid[b0 : b0 + step]
        dots = torch.einsum("btd,aod->abto", y_chunk, x_clean)  # (Nx, B, Ly, Lx)
        dots = torch.where(x_valid[:, None, None, :], dots, no_node)
        best = dots.argmax(dim=-1)  # lowest index among ties
        per_word = dots.gather(-1, best.unsqueeze(-1)).squeeze(-1)  # (Nx, B, Ly)
        per_word = torch.where(y_chunk_valid[None], per_word, 0)
        scores.append(per_word.sum(-1) / y_lens[b0 : b0 + step].to(acc))
        if with_indices:
            indices.append(torch.where(y_chunk_valid[None], best, -1))
    index = torch.cat(indices, dim=1) if with_indices else torch.empty(0, dtype=torch.long, device=x.device)
    return torch.cat(scores, dim=1), index
