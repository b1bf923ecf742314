"""The batches every model and the engine exchange: images, captions, or matched pairs.

One small dataclass per kind keeps the contract explicit: datasets build them,
models read the fields they need (a scene-graph model reads ``graphs``, a
bag-of-regions model ignores it), the trainer and the evaluator only move them
between devices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor


def _moved(batch: Any, device: torch.device | str) -> Any:
    """A copy of ``batch`` with every tensor field on ``device`` (other fields shared)."""
    changes = {f.name: getattr(batch, f.name).to(device) for f in fields(batch) if isinstance(getattr(batch, f.name), Tensor)}
    return replace(batch, **changes)


def _rows(batch: Any, start: int, stop: int) -> Any:
    """A copy of ``batch`` holding its rows ``start:stop`` (every tensor and per-item list field)."""
    changes = {f.name: getattr(batch, f.name)[start:stop] for f in fields(batch)
               if isinstance(getattr(batch, f.name), (Tensor, list))}
    return replace(batch, **changes)


@dataclass
class ImageBatch:
    """Region features of a batch of images.

    ``features``: (B, R, D) float32. ``index``: (B,) image index in the split.
    ``boxes``: optional (B, R, 4) x1 y1 x2 y2 normalised by the image size to
    [0, 1] (a copy; the stored array is never modified). ``graphs``: optional
    visual scene graphs, one dict per image in the layout of docs/architecture.md.
    ``relation_features``: optional (B, R_rel, D) float32 features of the union boxes of
    the graphs' relations (row r is relation r of ``graphs[b]``; zero past its relations).
    """

    features: Tensor
    index: Tensor
    boxes: Optional[Tensor] = None
    graphs: Optional[list[dict]] = None
    relation_features: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> "ImageBatch":
        return _moved(self, device)

    def rows(self, start: int, stop: int) -> "ImageBatch":
        """Images ``start:stop`` of the batch."""
        return _rows(self, start, stop)


@dataclass
class CaptionBatch:
    """Token ids of a batch of captions.

    ``ids``: (B, L) int64, wrapped in ``<start>``/``<end>``, padded with 0.
    ``lengths``: (B,) int64 valid lengths (start and end included).
    ``index``: (B,) caption index in the split; ``image_index``: (B,) index of
    the caption's image. ``graphs``: optional caption graphs, one dict per
    caption (token positions count from the first word, i.e. position p is
    ``ids[:, p + 1]``).
    """

    ids: Tensor
    lengths: Tensor
    index: Tensor
    image_index: Tensor
    graphs: Optional[list[dict]] = None

    def to(self, device: torch.device | str) -> "CaptionBatch":
        return _moved(self, device)

    def rows(self, start: int, stop: int) -> "CaptionBatch":
        """Captions ``start:stop``, padded to their own longest (as the loader pads a batch)."""
        part = _rows(self, start, stop)
        return replace(part, ids=part.ids[:, : int(part.lengths.max())])


@dataclass
class PairBatch:
    """Matched (image, caption) pairs for training: row b of ``images`` is the image of caption b."""

    images: ImageBatch
    captions: CaptionBatch

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.images.to(device), self.captions.to(device))

    def rows(self, start: int, stop: int) -> "PairBatch":
        """Pairs ``start:stop`` (a rank's shard of a global batch)."""
        return PairBatch(self.images.rows(start, stop), self.captions.rows(start, stop))
