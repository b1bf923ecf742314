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
:class:`LateIVFShortlister` buys the speed back for text -> image search: it scores only the
images an inverted file of node centroids finds, with centroids in place of nodes (PLAID).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops import max_sim
from ..reference import l2norm
from .pooled import unit_mean

SHORTLIST_BY = ("vectors", "late", "late-ivf")


def check_shortlist_by(shortlist_by: str, model_name: str) -> None:
    """Refuse an unknown first stage, or the late-interaction one on an index of a model other than SGM."""
    if shortlist_by not in SHORTLIST_BY:
        raise ValueError(f"--shortlist-by must be one of {', '.join(SHORTLIST_BY)}, got {shortlist_by!r}")
    if shortlist_by != "vectors" and model_name != "sgm":
        raise ValueError(f"--shortlist-by {shortlist_by} needs an SGM index (its object-level max_sim score); "
                         f"this index holds a {model_name!r} model")


def _loaded(parts: Sequence[np.ndarray]) -> tuple[Tensor, ...]:
    """The four SGM encoding parts of one gallery side, copied into memory as tensors."""
    return tuple(torch.from_numpy(np.ascontiguousarray(part)) for part in parts)


def _pooled_relations(relations: Tensor, counts: Tensor, chunk: int = 8192) -> Tensor:
    """``(n, d)`` unit means of every item's relation nodes, ``chunk`` items at a time."""
    return torch.cat([unit_mean(relations[i : i + chunk], counts[i : i + chunk]) for i in range(0, len(relations), chunk)])


class LateShortlister:
    """Exact top-k of the late-interaction score (module doc) of one query against one gallery side.

    ``parts``: the gallery side's four SGM encoding parts as the index serves them (object
    or word nodes, their counts, relation nodes, their counts; padding past a count is
    never read). ``gallery_is_image``: the items are images (a caption queries them) or
    captions (an image does). ``relation_weight``: the model's ``lambda``.
    """

    def __init__(self, parts: Sequence[np.ndarray], gallery_is_image: bool, relation_weight: float,
                 chunk: int = 8192) -> None:
        nodes, counts, relations, relation_counts = _loaded(parts)
        self.nodes, self.counts = nodes.float(), counts.to(torch.int64)
        self.relations = _pooled_relations(relations, relation_counts, chunk)
        self.gallery_is_image, self.relation_weight, self.chunk = gallery_is_image, relation_weight, chunk

    def scores(self, query: Any) -> Tensor:
        """The score of one query (an SGM encoding, its first item) with every gallery item, ``(n,)``."""
        nodes, count, relations, relation_count = (part[:1].cpu() for part in query)
        nodes = nodes.float()
        blocks = []
        for start in range(0, len(self.counts), self.chunk):
            gallery, counts = self.nodes[start : start + self.chunk], self.counts[start : start + self.chunk]
            if self.gallery_is_image:
                blocks.append(max_sim(gallery, nodes, counts, count)[:, 0])
            else:
                blocks.append(max_sim(nodes, gallery, count, counts)[0])
        return torch.cat(blocks) + self.relation_weight * (self.relations @ unit_mean(relations, relation_count)[0])

    @torch.no_grad()
    def __call__(self, query: Any, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` items with the highest score: ``(scores, rows)``, best first."""
        top = torch.topk(self.scores(query), k)
        return top.values, top.indices


def spherical_kmeans(points: Tensor, k: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """``(k, d)`` unit centroids of the unit rows of ``points (n, d)``, ``n >= k``: Lloyd's iterations on the cosine.

    Starts from ``k`` distinct rows drawn with ``seed``; a centroid that loses all its
    points keeps its place.
    """
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        kept = torch.bincount(assign, minlength=k) > 0
        centroids = torch.where(kept[:, None], l2norm(sums), centroids)
    return centroids


def nearest_centroid(points: Tensor, centroids: Tensor, chunk: int = 32768) -> Tensor:
    """``(n,)`` int64 index of the centroid with the highest dot product with each row of ``points``."""
    return torch.cat([(points[i : i + chunk] @ centroids.T).argmax(dim=1) for i in range(0, len(points), chunk)])


class LateIVFShortlister:
    """Text -> image: the late score of :class:`LateShortlister`, approximated on the images an inverted file finds.

    PLAID-style centroid interaction. Built once: spherical k-means puts the gallery's
    object nodes into ``centroids`` clusters (default: the power of two at most
    ``nodes / 64``; trained on at most ``64 * centroids`` nodes), and each cluster lists
    the images holding one of its nodes. A caption query scores its word nodes against the
    centroids once (``(L, C)``); the candidates are the images listed under each word's
    ``probes`` best centroids; each candidate's ``S_o`` is computed with its nodes
    replaced by their centroids (one gather), plus the pooled relation term. The work per
    query is the ``(L, C)`` table and the candidates, not the gallery. When fewer than
    ``k`` images are found, the probes double until there are enough (every image holds
    at least one object node, so probing every list finds them all).
    """

    def __init__(self, parts: Sequence[np.ndarray], relation_weight: float, centroids: int | None = None,
                 probes: int = 8, seed: int = 0) -> None:
        nodes, counts, relations, relation_counts = _loaded(parts)
        n, width = nodes.shape[:2]
        valid = torch.arange(width)[None, :] < counts[:, None]
        points = nodes[valid].float()
        if len(points) == 0:
            raise ValueError("--shortlist-by late-ivf: the index's images hold no object nodes")
        self.n_centroids = centroids or 2 ** max(int(np.log2(max(len(points) / 64, 1))), 0)
        if not 1 <= self.n_centroids <= len(points):
            raise ValueError(f"centroids must be in [1, {len(points)}] (the gallery's object nodes), got {self.n_centroids}")
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        sample = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[: 64 * self.n_centroids]
        self.centroids = spherical_kmeans(points[sample], self.n_centroids, seed=seed)
        assign = nearest_centroid(points, self.centroids)
        self.codes = torch.full((n, width), self.n_centroids, dtype=torch.int64)  # padding: the sentinel column
        self.codes[valid] = assign
        order = torch.argsort(assign, stable=True)
        self.images_by_centroid = torch.nonzero(valid)[:, 0][order]
        self.bounds = torch.searchsorted(assign[order], torch.arange(self.n_centroids + 1))
        self.relations = _pooled_relations(relations, relation_counts)
        self.relation_weight, self.probes = relation_weight, probes

    def _candidates(self, table: Tensor, k: int) -> Tensor:
        probes = self.probes
        while True:
            best = torch.topk(table, min(probes, self.n_centroids), dim=1).indices.reshape(-1).unique()
            found = torch.cat([self.images_by_centroid[self.bounds[c] : self.bounds[c + 1]] for c in best.tolist()]).unique()
            if len(found) >= k or probes >= self.n_centroids:
                return found
            probes *= 2

    @torch.no_grad()
    def __call__(self, query: Any, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` images with the highest approximate late score: ``(scores, rows)``, best first."""
        words, count, relations, relation_count = (part[:1].cpu() for part in query)
        words = words[0, : int(count[0])].float()
        table = words @ self.centroids.T
        rows = self._candidates(table, k)
        padded = torch.cat([table, torch.full((len(words), 1), float("-inf"))], dim=1)  # padding never wins a max
        approx = padded[:, self.codes[rows]].amax(dim=2).mean(dim=0)
        approx = approx + self.relation_weight * (self.relations[rows] @ unit_mean(relations, relation_count)[0])
        top = torch.topk(approx, k)
        return top.values, rows[top.indices]
