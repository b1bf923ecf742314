"""Per-caption BatchNorm over similarity-graph nodes, shared by the similarity-reasoning models.

SGRAF's published code (and MPSM, built on it) scores one caption at a time
against all images, so a ``BatchNorm1d(1)`` over node scores normalises, in
training, with the statistics of that caption's ``n_image x (words + 1)`` scores
and updates its running statistics once per caption, in caption order. The
batched models score many captions at once; these two functions reproduce that
exactly: masked per-caption statistics (padded nodes excluded), and the chain of
per-caption running-statistics updates in closed form. Batched this way the
result does not depend on how captions are chunked.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

# Open collect_running_stats blocks, innermost last: each a list of the updates it held back.
_collectors: list[list[tuple[nn.BatchNorm1d, Tensor, Tensor]]] = []


def caption_batch_norm(
    logits: Tensor, valid: Tensor, bn: nn.BatchNorm1d, training: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``bn`` applied to node scores ``logits (C, I, N)`` with per-caption statistics over ``valid (C, 1, N)``.

    Training: each caption ``c`` is normalised with the (biased) mean and variance of
    its valid scores over all images, and the detached ``(mean, unbiased variance)``
    per caption are returned for :func:`update_running_stats`. Evaluation: the
    running statistics, and ``None``. Padded entries of the output are meaningless
    (callers mask them).
    """
    stats = None
    if training:
        count = (valid.sum(dim=(1, 2)) * logits.shape[1]).to(logits.dtype)  # (C,)
        mean = logits.masked_fill(~valid, 0).sum(dim=(1, 2)) / count
        centred = (logits - mean[:, None, None]).masked_fill(~valid, 0)
        var = centred.pow(2).sum(dim=(1, 2)) / count
        stats = (mean.detach(), (var * count / (count - 1)).detach())
        mean, var = mean[:, None, None], var[:, None, None]
    else:
        mean, var = bn.running_mean, bn.running_var
    return (logits - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias, stats


@contextlib.contextmanager
def collect_running_stats() -> Iterator[list[tuple[nn.BatchNorm1d, Tensor, Tensor]]]:
    """Inside the block :func:`update_running_stats` records ``(bn, means, variances)`` instead of applying it.

    Distributed training (:func:`sgfused.distributed.global_batch_loss`) scores each rank's captions
    apart, then applies every rank's statistics once, in global caption order.
    """
    held: list[tuple[nn.BatchNorm1d, Tensor, Tensor]] = []
    _collectors.append(held)
    try:
        yield held
    finally:
        _collectors.pop()


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm1d, means: Tensor, variances: Tensor) -> None:
    """One running-statistics update of ``bn`` per caption (``means``, ``variances`` in caption order), in closed form."""
    if _collectors:
        _collectors[-1].append((bn, means, variances))
        return
    momentum, n = bn.momentum, means.shape[0]
    weights = momentum * (1 - momentum) ** torch.arange(n - 1, -1, -1, dtype=means.dtype, device=means.device)
    for running, batch in ((bn.running_mean, means), (bn.running_var, variances)):
        running.mul_((1 - momentum) ** n).add_((weights * batch.to(running.dtype)).sum())
    bn.num_batches_tracked.add_(n)
