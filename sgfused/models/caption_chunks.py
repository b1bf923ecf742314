"""Caption token checks and length-sorted caption chunks, shared by the models that score pairs per caption.

SGRAF and MPSM score every (image, caption) pair as nodes of one graph per pair;
they process captions in chunks sorted by length, each trimmed to its own longest
caption, so memory stays bounded and little work runs on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_lengths(lengths: Tensor, padded: int) -> None:
    """Caption lengths must be integers in ``[1, padded]``; the error names the range found."""
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > padded):
        raise ValueError(f"lengths must lie in [1, {padded}] (the padded length), got [{int(lengths.min())}, "
                         f"{int(lengths.max())}]")


def check_token_ids(ids: Tensor, lengths: Tensor, vocab_size: int) -> None:
    """Token ids ``(B, L)`` in ``[0, vocab_size)`` with lengths ``(B,)`` in ``[1, L]``."""
    if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"ids must be (B, L) and lengths (B,), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
    check_lengths(lengths, ids.shape[1])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}) (vocab_size), got [{int(ids.min())}, {int(ids.max())}]")


# Similarity nodes (caption x image x (words + 1)) per chunk, by device type. On the CPU a chunk's
# node vectors (16 Ki x sim_dim 256) stay in the caches between the reasoning's passes: SGRAF ran
# 1.35x faster than with 256 Ki nodes, in evaluation and in training, and with less memory.
# GPUs want big chunks (fewer, larger kernels).
CHUNK_NODES = {"cpu": 1 << 14, "cuda": 1 << 18}


def default_chunk_nodes(device: torch.device) -> int:
    """``CHUNK_NODES`` of the device's type (256 Ki for a type it has no entry for)."""
    return CHUNK_NODES.get(device.type, 1 << 18)


def caption_chunks(order: list[int], lengths: list[int], n_image: int, chunk_nodes: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (captions by length), each trimmed later to its longest caption.

    A chunk holds at most ``chunk_nodes`` nodes (but at least one caption); once it
    holds an eighth of that, it also ends where the caption length changes, so
    little of the reasoning runs on padding.
    """
    chunks: list[list[int]] = [[]]
    for caption in order:
        current = chunks[-1]
        size = (len(current) + 1) * n_image * (lengths[caption] + 1)
        if current and (size > chunk_nodes or (8 * size > chunk_nodes and lengths[caption] != lengths[current[-1]])):
            chunks.append([])
        chunks[-1].append(caption)
    return chunks
