"""SGM's shortlist by its own object-level score ``S_o``: late interaction instead of one vector per item.

A global vector per item (:mod:`sgfused.retrieval.pooled`) is a mean of an item's nodes,
so it cannot say which attribute belongs to which object. SGM scores a pair by
``S = S_o + S_r``, and ``S_o`` (:func:`sgfused.ops.max_sim` of the caption's word nodes
against the image's object nodes, every word taking its best object) keeps every node.
It is the first stage of ColBERT-style retrieval: an exact late-interaction score over
the whole gallery, after which the full score (``S_o + S_r``) re-ranks the best
``K'``. It reads only the parts the index already holds (SGM's nodes and their counts);
``S_r`` (the relation level) is what the second stage adds.

Cost: the gallery's nodes are held in memory, trimmed to the widest item's node count
(the index pads SGM's object nodes to the region count): ``4 * n * max_nodes * d`` bytes,
300 MB for 100,000 images of at most 6 objects at ``embed_size`` 128. A caption query is
then one ``max_sim`` call of ``n * max_nodes * words * d`` multiply-adds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops import max_sim

SHORTLIST_BY = ("vectors", "objects")


def check_shortlist_by(shortlist_by: str, model_name: str) -> None:
    """Refuse an unknown first stage, or the object-level one on an index of a model other than SGM."""
    if shortlist_by not in SHORTLIST_BY:
        raise ValueError(f"--shortlist-by must be one of {', '.join(SHORTLIST_BY)}, got {shortlist_by!r}")
    if shortlist_by == "objects" and model_name != "sgm":
        raise ValueError(f"--shortlist-by objects needs an SGM index (its object-level max_sim score); "
                         f"this index holds a {model_name!r} model")


class NodeShortlister:
    """Exact top-k of SGM's object-level score of one query against every item of one gallery side.

    ``nodes (n, width, d)`` and ``counts (n,)``: the gallery side's node part and its counts
    as the index stores them (padding past each count is never read). ``gallery_is_image``:
    the gallery's items are images (a caption queries them) or captions (an image does).
    """

    def __init__(self, nodes: np.ndarray, counts: np.ndarray, gallery_is_image: bool, chunk: int = 8192) -> None:
        self.counts = torch.from_numpy(np.ascontiguousarray(counts)).to(torch.int64)
        width = max(int(self.counts.max()), 1) if len(self.counts) else 1
        self.nodes = torch.from_numpy(np.ascontiguousarray(nodes[:, :width])).float()
        self.gallery_is_image, self.chunk = gallery_is_image, chunk

    def scores(self, query: Tensor, query_count: Tensor) -> Tensor:
        """``S_o`` of the query (``(1, L, d)`` nodes, ``(1,)`` count) with every gallery item, ``(n,)``."""
        query, query_count = query.float().cpu(), query_count.cpu()
        blocks = []
        for start in range(0, len(self.counts), self.chunk):
            nodes, counts = self.nodes[start : start + self.chunk], self.counts[start : start + self.chunk]
            if self.gallery_is_image:
                blocks.append(max_sim(nodes, query, counts, query_count)[:, 0])
            else:
                blocks.append(max_sim(query, nodes, query_count, counts)[0])
        return torch.cat(blocks)

    @torch.no_grad()
    def __call__(self, query: Tensor, query_count: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` items with the highest ``S_o``: ``(scores, rows)``, best first."""
        top = torch.topk(self.scores(query, query_count), k)
        return top.values, top.indices


def query_nodes(encoding: Any) -> tuple[Tensor, Tensor]:
    """The object-level nodes and count of one SGM encoding (an image's objects or a caption's words)."""
    return encoding[0][:1], encoding[1][:1]
