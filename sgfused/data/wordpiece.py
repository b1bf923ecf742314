"""Word pieces for a BERT text encoder, aligned to the words of the caption vocabulary.

Why. Caption graphs and every model count *word* positions (position p of a caption
is token id ``p + 1``, after ``<start>``); BERT reads *word pieces*. The table maps
each vocabulary word to its pieces under the BERT folder's own tokenizer
(``<start>`` -> ``[CLS]``, ``<end>`` -> ``[SEP]``, ``<unk>`` -> ``[UNK]``), so a batch
of token ids becomes piece ids with, for each piece, the word position it came
from. After BERT, :meth:`WordPieces.pool` averages each word's pieces back to one
vector per word position, so word positions (and the caption graphs over them) are
exactly those of the bi-GRU path. A word outside the caption vocabulary is
``<unk>`` in the ids and so ``[UNK]`` for BERT too.

Nothing is downloaded: :func:`load_bert` reads the model and the tokenizer from a
local folder (``save_pretrained`` layout) with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .vocab import Vocabulary


def load_bert(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The BERT model and tokenizer stored in the folder ``path``; one-line errors when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"bert_path {path!r} is not a folder; expected a local BERT model and its tokenizer "
                                f"(save_pretrained layout: config.json, the weights, vocab.txt)")
    try:
        import transformers
    except ImportError:
        raise ImportError("text_encoder='bert' needs the transformers package: pip install 'sgfused[bert]'") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"bert_path {path!r}: cannot read a BERT model and tokenizer from it ({reason})") from None
    return model, tokenizer


@dataclass
class WordPieces:
    """Piece ids ``(B, P)``, attention ``mask (B, P)`` and the word position ``word (B, P)`` of every piece."""

    ids: Tensor
    mask: Tensor
    word: Tensor

    def pool(self, hidden: Tensor, n_words: int) -> Tensor:
        """``(B, P, H)`` piece states -> ``(B, n_words, H)``: the mean of each word's pieces (0 for padding)."""
        positions = torch.arange(n_words, device=hidden.device)
        assign = (self.word[:, None, :] == positions[None, :, None]) & self.mask[:, None, :].bool()  # (B, W, P)
        weights = assign.to(hidden.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
        return weights @ hidden


class WordPieceTable:
    """Each vocabulary id's word pieces under ``tokenizer``; :meth:`pieces` converts a batch of token ids."""

    def __init__(self, vocab: Vocabulary, tokenizer: Any) -> None:
        special = {"<start>": [tokenizer.cls_token_id], "<end>": [tokenizer.sep_token_id],
                   "<unk>": [tokenizer.unk_token_id], "<pad>": [tokenizer.pad_token_id]}
        self.table: list[list[int]] = []
        for index in range(len(vocab)):
            word = vocab.idx2word[index]
            pieces = special.get(word) or tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
            self.table.append(list(pieces) or [tokenizer.unk_token_id])
        self.pad_id = tokenizer.pad_token_id
        self.max_pieces = int(getattr(tokenizer, "model_max_length", 512) or 512)

    def pieces(self, ids: Tensor, lengths: Tensor) -> WordPieces:
        """Token ids ``(B, L)`` with lengths ``(B,)`` -> the captions' word pieces, padded with ``[PAD]``."""
        rows, words = [], []
        for caption, length in zip(ids.tolist(), lengths.tolist()):
            row, word = [], []
            for position, token in enumerate(caption[:length]):
                pieces = self.table[token]
                row += pieces
                word += [position] * len(pieces)
            if len(row) > self.max_pieces:
                raise ValueError(f"a caption of {length} words has {len(row)} word pieces, more than the tokenizer's "
                                 f"model_max_length {self.max_pieces}")
            rows.append(row)
            words.append(word)
        width = max(len(row) for row in rows)
        piece_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        word_of = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, (row, word) in enumerate(zip(rows, words)):
            piece_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            word_of[b, : len(word)] = torch.tensor(word, dtype=torch.long)
        device = ids.device
        return WordPieces(piece_ids.to(device), (word_of >= 0).long().to(device), word_of.to(device))
