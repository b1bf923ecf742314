"""Why a pair matched: for each caption word, the image regions the model attended to most.

* SGRAF: the SCAN text-to-image attention its local similarity vectors are built from
  (docs/cross_attention_contract.md): ``s_kj = leaky_relu(region_k . word_j, 0.1)``,
  l2-normalised over the caption's words, then ``softmax_k(smooth * s_kj)`` over the
  regions; a word's weights over the regions sum to 1. The fused ``cross_attention`` op
  never materialises these weights (that is what makes it fast), so they are recomputed
  here for the one pair being explained; :func:`scan_attention_weights` is tested to give
  the op's reference context vectors.
* SGM: its object-level score takes, for each word node, the best-matching object node
  (``max_sim``); ``max_sim(..., return_indices=True)`` names that region and the weight
  shown is the cosine of the pair of nodes.

Each region comes with its box (fractions of the image size) and, where the index holds
the split's visual graphs (synthetic data always does), its object label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..ops import max_sim
from .index import GalleryIndex

EXPLAINED_MODELS = ("sgraf", "sgm")
LEAKY = 0.1  # SCAN / SGRAF's leaky-ReLU slope (the cross_attention op's default)


@dataclass
class Region:
    """One region a word attended to: its index in the image, the weight, its box and label when known."""

    region: int
    weight: float
    box: list[float] | None
    label: str | None


@dataclass
class WordAlignment:
    """A caption word (``position`` counts from the first word) and its most attended regions, strongest first."""

    position: int
    word: str
    known: bool
    regions: list[Region]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_attention_weights(words: Tensor, regions: Tensor, smooth: float, eps: float = 1e-8) -> Tensor:
    """``(n_words, n_regions)`` SCAN attention of one caption's valid words ``(n_words, d)`` over ``regions (R, d)``."""
    scores = F.leaky_relu(regions @ words.t(), LEAKY)  # (R, n_words)
    scores = scores / (torch.linalg.vector_norm(scores, dim=1, keepdim=True) + eps)  # over the words
    return torch.softmax(smooth * scores, dim=0).t()


def check_explainable(model_name: str) -> None:
    if model_name not in EXPLAINED_MODELS:
        raise ValueError(
            f"--explain needs a model with word-region alignment ({', '.join(EXPLAINED_MODELS)}); "
            f"the index holds a {model_name!r} model, whose score compares whole-image and whole-caption vectors"
        )


@torch.no_grad()
def explain_pair(
    model: Any,
    index: GalleryIndex,
    image: int,
    image_encoding: Any,
    caption_encoding: Any,
    words: Sequence[str],
    known: Sequence[bool],
    top_regions: int = 3,
) -> list[WordAlignment]:
    """Each word's most attended regions of image ``image`` (encodings of one image and one caption).

    ``words``: the caption's tokens (the encoding holds ``<start>``, the words, ``<end>``);
    ``known``: whether each is in the vocabulary.
    """
    name = index.model_name
    check_explainable(name)
    if top_regions < 1:
        raise ValueError(f"top_regions must be >= 1, got {top_regions}")
    if name == "sgraf":
        nodes, (word_nodes, lengths) = image_encoding[0], caption_encoding
        count = int(lengths[0])
        weights = scan_attention_weights(word_nodes[0, :count].float(), nodes.float(), model.lambda_softmax)
        k = min(top_regions, weights.shape[1])
        best = torch.topk(weights, k, dim=1)
        chosen = [list(zip(best.indices[p].tolist(), best.values[p].tolist())) for p in range(count)]
    else:
        objects, n_objects = image_encoding[0], image_encoding[1]
        word_nodes, n_words = caption_encoding[0], caption_encoding[1]
        _, argmax = max_sim(objects.float(), word_nodes.float(), n_objects, n_words, return_indices=True, backend=model.backend)
        count = int(n_words[0])
        regions = argmax[0, 0, :count]
        cosines = (word_nodes[0, :count].float() * objects[0, regions].float()).sum(-1)
        chosen = [[(int(regions[p]), float(cosines[p]))] for p in range(count)]
    if count != len(words) + 2:
        raise ValueError(f"the caption encoding has {count} positions, expected {len(words)} words + <start> + <end>")
    return [
        WordAlignment(p, words[p], bool(known[p]), [_region(index, image, r, w) for r, w in chosen[p + 1]])
        for p in range(len(words))
    ]


def _region(index: GalleryIndex, image: int, region: int, weight: float) -> Region:
    box = [float(v) for v in index.boxes[image, region]] if index.boxes is not None else None
    label = None
    if index.region_labels is not None:
        labels = index.region_labels[image]
        label = labels[region] if region < len(labels) else None  # not one of the graph's objects
    return Region(region, float(weight), box, label)
