"""SGM's shortlist by late interaction: its object level exact, its relation level pooled.

A global vector per item (:mod:`sgfused.retrieval.pooled`) is the mean of an item's nodes,
so it cannot say which attribute belongs to which object. SGM scores a pair by
``S = S_o + lambda * S_r``; its object level ``S_o`` (:func:`sgfused.ops.max_sim` of the
caption's word nodes against the image's object nodes, every word taking its best object)
keeps every node. The first stage here ranks the whole gallery by

    ``S_o + lambda * cos(mean relation nodes of the image, mean relation nodes of the caption)``

``S_o`` exact, as ColBERT's late interaction; the relation level pooled to one unit vector
per item, since a synthetic gallery holds many images of the same objects that only their
relations tell apart. The full score (exact ``S_r``) then re-ranks the best ``K'``. It reads
only the parts the index already holds.

Cost: the gallery's object nodes are held in memory (up to the widest item's count, as
:class:`sgfused.retrieval.GalleryIndex` serves them): ``4 * n * max_nodes * d`` bytes, 300
MB for 100,000 images of at most 6 objects at ``embed_size`` 128 (their 500,000 captions'
word nodes, the gallery of image -> text search, take 6.6 GB), plus one pooled vector
per item. A query is one ``max_sim`` call over them: ``S_o`` is most of SGM's score, so
this first stage costs most of what exhaustive scoring does (it only skips the reading
and ``S_r``); it buys recall, not speed (README, Search a gallery).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops import max_sim
from .pooled import unit_mean

SHORTLIST_BY = ("vectors", "late")


def check_shortlist_by(shortlist_by: str, model_name: str) -> None:
    """Refuse an unknown first stage, or the late-interaction one on an index of a model other than SGM."""
    if shortlist_by not in SHORTLIST_BY:
        raise ValueError(f"--shortlist-by must be one of {', '.join(SHORTLIST_BY)}, got {shortlist_by!r}")
    if shortlist_by == "late" and model_name != "sgm":
        raise ValueError(f"--shortlist-by late needs an SGM index (its object-level max_sim score); "
                         f"this index holds a {model_name!r} model")


class LateShortlister:
    """Exact top-k of the late-interaction score (module doc) of one query against one gallery side.

    ``parts``: the gallery side's four SGM encoding parts as the index serves them (object
    or word nodes, their counts, relation nodes, their counts; padding past a count is
    never read). ``gallery_is_image``: the items are images (a caption queries them) or
    captions (an image does). ``relation_weight``: the model's ``lambda``.
    """

    def __init__(self, parts: Sequence[np.ndarray], gallery_is_image: bool, relation_weight: float,
                 chunk: int = 8192) -> None:
        nodes, counts, relations, relation_counts = (torch.from_numpy(np.ascontiguousarray(part)) for part in parts)
        self.nodes, self.counts = nodes.float(), counts.to(torch.int64)
        self.relations = torch.cat([unit_mean(relations[i : i + chunk], relation_counts[i : i + chunk])
                                    for i in range(0, len(relations), chunk)])
        self.gallery_is_image, self.relation_weight, self.chunk = gallery_is_image, relation_weight, chunk

    def scores(self, query: Any) -> Tensor:
        """The score of one query (an SGM encoding, its first item) with every gallery item, ``(n,)``."""
        nodes, count, relations, relation_count = (part[:1].cpu() for part in query)
        blocks = []
        for start in range(0, len(self.counts), self.chunk):
            gallery, counts = self.nodes[start : start + self.chunk], self.counts[start : start + self.chunk]
            if self.gallery_is_image:
                blocks.append(max_sim(gallery, nodes.float(), counts, count)[:, 0])
            else:
                blocks.append(max_sim(nodes.float(), gallery, count, counts)[0])
        return torch.cat(blocks) + self.relation_weight * (self.relations @ unit_mean(relations, relation_count)[0])

    @torch.no_grad()
    def __call__(self, query: Any, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` items with the highest score: ``(scores, rows)``, best first."""
        top = torch.topk(self.scores(query), k)
        return top.values, top.indices
