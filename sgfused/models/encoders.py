"""Encoders shared by the models: projected region features and a bi-GRU over word embeddings.

Both follow the SCAN / VSE++ / SGRAF code the papers build on: a linear
projection of the 2048-d bottom-up region features (Xavier-uniform weight,
zero bias) and a word embedding (uniform in ±0.1) read by a GRU whose two
directions are averaged, each optionally l2-normalised per position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..reference import l2norm


class RegionEncoder(nn.Module):
    """``(B, R, img_dim)`` region features → ``(B, R, embed_size)``, l2-normalised unless ``normalize=False``."""

    def __init__(self, img_dim: int, embed_size: int, normalize: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.normalize = normalize
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.fc.in_features:
            raise ValueError(
                f"features: expected last dimension {self.fc.in_features} (img_dim), got shape {tuple(features.shape)}"
            )
        regions = self.fc(features)
        return l2norm(regions) if self.normalize else regions


class GRUTextEncoder(nn.Module):
    """Token ids ``(B, L)`` with lengths ``(B,)`` → word features ``(B, L, embed_size)``, zero past each length.

    With ``bidirectional=True`` the forward and backward states are averaged
    (SCAN/SGRAF), so the output width is ``embed_size`` either way.
    """

    def __init__(
        self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
        bidirectional: bool = True, normalize: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.normalize = normalize
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"ids must be (B, L) and lengths (B,); got {tuple(ids.shape)} and {tuple(lengths.shape)}")
        packed = pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        words, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        if self.rnn.bidirectional:
            forward, backward = words.chunk(2, dim=-1)
            words = (forward + backward) / 2
        return l2norm(words) if self.normalize else words


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` bool: True at positions below each length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
