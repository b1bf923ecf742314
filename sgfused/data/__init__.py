"""Datasets, vocabulary, scene graphs and the synthetic scene generator."""

from .batch import CaptionBatch, ImageBatch, PairBatch
from .graphs import load_caption_graphs, parse_captions, save_caption_graphs
from .precomp import PrecompSplit, caption_loader, image_loader, pair_loader, read_captions
from .vocab import Vocabulary, tokenize

__all__ = [
    "CaptionBatch", "ImageBatch", "PairBatch", "PrecompSplit", "Vocabulary", "caption_loader", "image_loader",
    "load_caption_graphs", "pair_loader", "parse_captions", "read_captions", "save_caption_graphs", "tokenize",
]
