"""One global vector per image and per caption, from a model's own pooled encodings: the shortlist's key.

A cross-attention model scores every (image, caption) pair with its full fused
computation, too slow to run over a gallery of 100K items for each query. Each
model here also has a cheap global view of an item that it computes anyway:

* SGRAF: the self-attended image vector ``v_global_w(regions)`` and caption vector
  ``t_global_w(words, lengths)`` (the global node of its similarity graph);
* SGM: the mean of the image's object nodes and the mean of the caption's word nodes
  (its object-level score ``S_o`` is a mean of per-word maxima over these nodes);
* VSE++: its encodings are already one vector each (its score *is* this cosine).

All vectors are l2-normalised, so the shortlist score is their dot product.
Models without such a view are refused by name (:func:`check_supported`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.encoders import valid_mask
from ..reference import l2norm

SUPPORTED_MODELS = ("sgraf", "sgm", "vsepp")


def check_supported(model_name: str) -> None:
    """Refuse a model whose encodings this package does not know how to pool, pad and explain."""
    if model_name not in SUPPORTED_MODELS:
        raise ValueError(
            f"retrieval supports the models {', '.join(SUPPORTED_MODELS)}; the checkpoint holds a {model_name!r} model"
        )


def unit_mean(nodes: Tensor, counts: Tensor) -> Tensor:
    """``(n, d)`` l2-normalised fp32 means of the first ``counts[i]`` of each item's ``nodes (n, width, d)``."""
    nodes = nodes.float()
    mask = valid_mask(counts.to(nodes.device), nodes.shape[1]).unsqueeze(-1).to(nodes.dtype)
    return l2norm((nodes * mask).sum(dim=1) / counts.to(nodes.device).clamp(min=1).unsqueeze(-1).to(nodes.dtype))


def image_vectors(model: Any, model_name: str, encoding: Any) -> Tensor:
    """``(n, d)`` unit global vectors of a batch of image encodings (from ``model.encode_images``)."""
    check_supported(model_name)
    if model_name == "sgraf":
        return model.sim_encoder.v_global_w(encoding).float()
    if model_name == "sgm":
        objects, n_objects = encoding[0], encoding[1]
        return unit_mean(objects, n_objects)
    return encoding.float()


def caption_vectors(model: Any, model_name: str, encoding: Any) -> Tensor:
    """``(n, d)`` unit global vectors of a batch of caption encodings (from ``model.encode_captions``)."""
    check_supported(model_name)
    if model_name == "sgraf":
        words, lengths = encoding
        lengths = lengths.to(words.device)
        words = words.masked_fill(~valid_mask(lengths, words.shape[1]).unsqueeze(-1), 0)  # as SGRAF.similarity does
        return model.sim_encoder.t_global_w(words, lengths).float()
    if model_name == "sgm":
        words, n_words = encoding[0], encoding[1]
        return unit_mean(words, n_words)
    return encoding.float()


class Shortlister:
    """Exact inner-product top-k over one gallery of global vectors, its search structure built once.

    ``gallery (n, d)`` float32. ``use_faiss``: None uses faiss when it is importable, True
    requires it, False uses ``torch.topk`` over ``gallery @ query``. Both are exact searches,
    so they return the same rows up to ties.
    """

    def __init__(self, gallery: Tensor, use_faiss: bool | None = None) -> None:
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self.gallery = gallery
        if self.use_faiss:
            import faiss

            self._faiss = faiss.IndexFlatIP(gallery.shape[1])
            self._faiss.add(gallery.float().contiguous().numpy())

    @torch.no_grad()
    def __call__(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` rows with the highest dot product with ``query (d,)``: ``(scores, rows)``, best first."""
        if self.use_faiss:
            scores, rows = self._faiss.search(query.float().reshape(1, -1).contiguous().numpy(), k)
            return torch.from_numpy(scores[0]), torch.from_numpy(rows[0]).to(torch.int64)
        top = torch.topk(self.gallery @ query, k)
        return top.values, top.indices


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package (``pip install sgfused[faiss]``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
