"""VSE++ baseline (Faghri et al.): one vector per image and per caption, cosine similarity.

The small model the engine is exercised with before the paper models: the image
is the mean of its projected regions, the caption the mean of its bi-GRU word
states over valid positions, both l2-normalised; the score is their dot
product, trained with the in-batch hardest-negative loss. (The original VSE++
encodes whole images with a CNN; on precomputed region features the mean of
projected regions is the usual stand-in.)
"""

from __future__ import annotations

from torch import Tensor

from ..data.batch import CaptionBatch, ImageBatch
from ..reference import l2norm
from .base import RetrievalModel
from .encoders import GRUTextEncoder, RegionEncoder, valid_mask
from .registry import register_model


@register_model("vsepp")
class VSEPP(RetrievalModel):
    """Mean-of-regions image vector, mean-of-words caption vector, cosine score."""

    def __init__(
        self, vocab_size: int, *, img_dim: int = 2048, embed_size: int = 1024, word_dim: int = 300,
        num_layers: int = 1, bi_gru: bool = True,
    ) -> None:
        super().__init__()
        self.image_encoder = RegionEncoder(img_dim, embed_size, normalize=False)
        self.text_encoder = GRUTextEncoder(vocab_size, word_dim, embed_size, num_layers, bi_gru, normalize=False)

    def encode_images(self, images: ImageBatch) -> Tensor:
        return l2norm(self.image_encoder(images.features).mean(dim=1))

    def encode_captions(self, captions: CaptionBatch) -> Tensor:
        words = self.text_encoder(captions.ids, captions.lengths)
        mask = valid_mask(captions.lengths, words.shape[1]).unsqueeze(-1)
        mean = (words * mask).sum(dim=1) / captions.lengths.clamp(min=1).unsqueeze(-1).to(words.dtype)
        return l2norm(mean)

    def similarity(self, images: Tensor, captions: Tensor) -> Tensor:
        return images @ captions.t()
