"""Search an index by caption (text -> image) or by one of its images (image -> text), in one or two stages.

Exhaustive search scores the query against every gallery item with the model's full
(fused) similarity, in chunks of ``chunk`` items. Two-stage search first keeps the
``shortlist`` items whose global vectors (:mod:`sgfused.retrieval.pooled`) have the
highest dot product with the query's, then re-ranks only those with the full score.
The global vectors are the index's shortlist key: the model's own, or a second
checkpoint's (``sgfused index --shortlist-checkpoint``), which then also encodes a
typed caption's vector.
For SGM, ``shortlist_by="late"`` shortlists by late interaction instead: its own
object-level score ``S_o`` plus its relation level pooled (:mod:`sgfused.retrieval.late`);
``"late-ivf"`` approximates that score on the images an inverted file of node centroids
finds (text -> image), so the first stage no longer touches the whole gallery.
Either way the hits are ordered by the full score, ties by item index, and each carries
its shortlist score too.

A caption query is tokenised as the split's captions were (:func:`sgfused.data.vocab.tokenize`)
and encoded with the checkpoint's vocabulary; words outside it become ``<unk>`` and are
reported; a caption with no known word is refused. SGM reads a caption graph: a typed
query gets one without relations (its relation-level score then compares the sentence's
final state), since parsing needs spaCy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..data.batch import CaptionBatch
from ..data.vocab import tokenize
from .explain import WordAlignment, explain_pair
from .index import GalleryIndex
from . import late, pooled


DEFAULT_TOP = 10


@dataclass
class Hit:
    """One result: ``item`` is an image index (text -> image) or a caption index (image -> text)."""

    rank: int
    item: int
    score: float
    shortlist_score: float
    image: int
    caption: str | None = None
    alignment: list[WordAlignment] | None = None


def _unknown(tokens: list[str], known: list[bool]) -> list[str]:
    """The tokens a vocabulary lacks (``known`` flags them), in caption order."""
    return [token for token, k in zip(tokens, known) if not k]


@dataclass
class SearchResult:
    """A query and its hits, with how they were found (``stage``: "exhaustive" or "two-stage (faiss|torch)")."""

    direction: str  # "t2i" or "i2t"
    query: dict[str, Any]
    hits: list[Hit]
    stage: str
    shortlist: int | None
    gallery_size: int
    unknown_words: list[str] = field(default_factory=list)
    shortlist_unknown_words: list[str] = field(default_factory=list)  # those of a shortlist checkpoint's vocabulary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bare_caption_graph(tokens: list[str]) -> dict[str, list]:
    """A caption graph without objects or relations for a typed query (see the module doc)."""
    return {"tokens": list(tokens), "heads": [-1] * len(tokens), "objects": [], "attributes": [], "relations": []}


class Searcher:
    """Queries one index with the checkpoint that built it (checked on construction).

    ``shortlist_by``: the first stage, "vectors" (the index's global vectors; faiss per
    ``use_faiss``), "late" or "late-ivf" (SGM indexes, :mod:`sgfused.retrieval.late`: exact
    late interaction, or its approximation over an inverted file, text -> image only; the
    shortlist score of every hit is then that score).
    """

    def __init__(self, index: GalleryIndex | str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 *, device: str | torch.device = "cpu", use_faiss: bool | None = None, chunk: int = 1024,
                 shortlist_checkpoint: str | os.PathLike | None = None, shortlist_by: str = "vectors") -> None:
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex.open(index)
        late.check_shortlist_by(shortlist_by, self.index.model_name)
        self.shortlist_by = shortlist_by
        self.model, self.vocab = self.index.load_model(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        # the model and vocabulary that encode a typed caption's shortlist vector (the index's own by default)
        self.key_name = self.index.shortlist_model_name or self.index.model_name
        self.key_model, self.key_vocab = self.index.load_shortlist_model(shortlist_checkpoint) or (self.model, self.vocab)
        self.key_model.to(self.device).eval()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.use_faiss, self.chunk = use_faiss, chunk
        self._shortlisters: dict[str, Any] = {}  # per kind, built on first use

    # ------------------------------------------------------------------ queries
    def encode_caption(self, text: str, shortlist_key: bool = False) -> tuple[Any, list[str], list[bool]]:
        """The encoding of a typed caption, its tokens and which of them the vocabulary knows.

        ``shortlist_key``: encode it with the shortlist key's model and vocabulary instead.
        """
        model, vocab = (self.key_model, self.key_vocab) if shortlist_key else (self.model, self.vocab)
        tokens = tokenize(text)
        known = [token in vocab.word2idx for token in tokens]
        if not any(known):
            shown = " ".join(tokens) if tokens else "(no words)"
            whose = "shortlist checkpoint's" if shortlist_key else "checkpoint's"
            raise ValueError(
                f"--caption {text!r}: none of its words is in the {whose} vocabulary of {len(vocab)} words "
                f"(unknown: {shown})"
            )
        ids = torch.tensor([vocab.encode(tokens)], dtype=torch.int64)
        needs_graph = "caption_graphs" in type(model).data_requirements
        batch = CaptionBatch(ids, torch.tensor([ids.shape[1]]), torch.zeros(1, dtype=torch.int64),
                             torch.zeros(1, dtype=torch.int64), [_bare_caption_graph(tokens)] if needs_graph else None)
        with torch.no_grad():
            return model.encode_captions(batch.to(self.device)), tokens, known

    @torch.no_grad()
    def by_caption(self, text: str, top: int | None = None, shortlist: int | None = None, explain: bool = False) -> SearchResult:
        """The ``top`` images for caption ``text`` (default :data:`DEFAULT_TOP`, or all when the gallery is smaller)."""
        top = self._check_counts(top, shortlist, self.index.n_images, "images")
        encoding, tokens, known = self.encode_caption(text)
        key, key_unknown = encoding, []
        if self.key_model is not self.model:
            key, _, key_known = self.encode_caption(text, shortlist_key=True)
            key_unknown = _unknown(tokens, key_known)
        vector = pooled.caption_vectors(self.key_model, self.key_name, key)[0].cpu()
        result = self._images_for(encoding, vector, tokens, known, {"caption": text, "tokens": tokens}, top, shortlist,
                                  explain)
        result.shortlist_unknown_words = key_unknown
        return result

    @torch.no_grad()
    def by_indexed_caption(self, caption: int, top: int | None = None, shortlist: int | None = None,
                           explain: bool = False) -> SearchResult:
        """The ``top`` images for caption ``caption`` of the index, scored from its stored encoding.

        This is the query evaluation makes (for SGM with the split's caption graph, which a
        typed caption lacks); benchmarks and recall checks use it.
        """
        if isinstance(caption, bool) or not isinstance(caption, int) or not 0 <= caption < self.index.n_captions:
            raise ValueError(f"caption must be a caption index in [0, {self.index.n_captions}) of the index, got {caption!r}")
        top = self._check_counts(top, shortlist, self.index.n_images, "images")
        encoding = self._stored("caption", [caption])
        tokens = tokenize(self.index.captions[caption])
        known = [token in self.vocab.word2idx for token in tokens]
        return self._images_for(encoding, self.index.vectors["caption"][caption], tokens, known,
                                {"caption": self.index.captions[caption], "tokens": tokens, "index": caption},
                                top, shortlist, explain)

    def _images_for(self, encoding: Any, vector: Tensor, tokens: list[str], known: list[bool], query: dict[str, Any],
                    top: int, shortlist: int | None, explain: bool) -> SearchResult:
        """Text -> image search for one encoded caption (its global ``vector``), in one or two stages."""
        rows, coarse, stage = self._candidates("image", shortlist, vector, encoding)
        scores = self._score_images(rows, encoding)
        hits = self._ranked(rows, scores, coarse, top, "image")
        if explain:
            for hit in hits:
                hit.alignment = explain_pair(self.model, self.index, hit.image, self._stored("image", [hit.image]),
                                             encoding, tokens, known)
        return SearchResult("t2i", query, hits, stage, shortlist, self.index.n_images, _unknown(tokens, known))

    @torch.no_grad()
    def by_image(self, image: int, top: int | None = None, shortlist: int | None = None, explain: bool = False) -> SearchResult:
        """The ``top`` captions for image ``image`` of the index (default as :meth:`by_caption`)."""
        if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < self.index.n_images:
            raise ValueError(f"--image must be an image index in [0, {self.index.n_images}) of the index, got {image!r}")
        top = self._check_counts(top, shortlist, self.index.n_captions, "captions")
        encoding = self._stored("image", [image])
        vector = self.index.vectors["image"][image]
        rows, coarse, stage = self._candidates("caption", shortlist, vector, encoding)
        scores = self._score_captions(rows, encoding)
        hits = self._ranked(rows, scores, coarse, top, "caption")
        cpi = self.index.manifest["captions_per_image"]
        for hit in hits:
            hit.image, hit.caption = hit.item // cpi, self.index.captions[hit.item]
            if explain:
                tokens = tokenize(hit.caption)
                hit.alignment = explain_pair(self.model, self.index, image, encoding,
                                             self._stored("caption", [hit.item]), tokens,
                                             [t in self.vocab.word2idx for t in tokens])
        return SearchResult("i2t", {"image": image}, hits, stage, shortlist, self.index.n_captions)

    # ------------------------------------------------------------------ stages
    def _check_counts(self, top: int | None, shortlist: int | None, size: int, what: str) -> int:
        """``top`` (its default filled in) after checking it and ``shortlist`` against a gallery of ``size``."""
        if shortlist is not None and (isinstance(shortlist, bool) or not isinstance(shortlist, int)
                                      or not 1 <= shortlist <= size):
            raise ValueError(f"--shortlist must be in [1, {size}] (the index holds {size} {what}), got {shortlist!r}")
        if top is None:
            top = min(DEFAULT_TOP, size if shortlist is None else shortlist)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= size:
            raise ValueError(f"--top must be in [1, {size}] (the index holds {size} {what}), got {top!r}")
        if shortlist is None:
            return top
        if shortlist < top:
            raise ValueError(f"--shortlist ({shortlist}) must be >= --top ({top}): the re-ranking only orders the shortlist")
        return top

    def _candidates(self, kind: str, shortlist: int | None, vector: Tensor, encoding: Any) -> tuple[Tensor, Tensor, str]:
        """Gallery ``kind`` rows to score fully (ascending) and their shortlist scores; all rows without a shortlist.

        The query is its global ``vector`` or, with late interaction, its SGM ``encoding``.
        Exhaustive search reports the global-vector score as every item's shortlist score.
        """
        if shortlist is None:
            gallery = self.index.vectors[kind]
            return torch.arange(gallery.shape[0]), gallery @ vector, "exhaustive"
        shortlister = self.shortlister(kind)
        if isinstance(shortlister, pooled.Shortlister):
            coarse, rows = shortlister(vector, shortlist)
            stage = f"two-stage ({'faiss' if shortlister.use_faiss else 'torch'})"
        else:
            coarse, rows = shortlister(encoding, shortlist)
            stage = f"two-stage ({self.shortlist_by})"
        order = torch.argsort(rows)
        return rows[order], coarse[order], stage

    def shortlister(self, kind: str) -> pooled.Shortlister | late.LateShortlister | late.LateIVFShortlister:
        """The first stage over gallery side ``kind`` ("image" / "caption"), built on first use and kept."""
        if kind not in self._shortlisters:
            if self.shortlist_by == "late":
                self._shortlisters[kind] = late.LateShortlister(self.index.parts[kind], kind == "image",
                                                                self.model.relation_weight)
            elif self.shortlist_by == "late-ivf":
                if kind != "image":
                    raise ValueError("--shortlist-by late-ivf searches images by caption (text -> image); "
                                     "with --image use late or vectors")
                self._shortlisters[kind] = late.LateIVFShortlister(self.index.parts[kind], self.model.relation_weight)
            else:
                self._shortlisters[kind] = pooled.Shortlister(self.index.vectors[kind], self.use_faiss)
        return self._shortlisters[kind]

    def _stored(self, kind: str, rows: Any) -> Any:
        encoding = self.index.encoding(kind, rows)
        if isinstance(encoding, tuple):
            return tuple(part.to(self.device) for part in encoding)
        return encoding.to(self.device)

    def _score_images(self, rows: Tensor, caption: Any) -> Tensor:
        """Full scores of the caption against image ``rows``, ``chunk`` images per similarity call."""
        blocks = [self.model.similarity(self._stored("image", rows[i : i + self.chunk]), caption)[:, 0].float().cpu()
                  for i in range(0, len(rows), self.chunk)]
        return torch.cat(blocks)

    def _score_captions(self, rows: Tensor, image: Any) -> Tensor:
        """Full scores of the image against caption ``rows``, ``chunk`` captions per similarity call."""
        blocks = [self.model.similarity(image, self._stored("caption", rows[i : i + self.chunk]))[0].float().cpu()
                  for i in range(0, len(rows), self.chunk)]
        return torch.cat(blocks)

    def _ranked(self, rows: Tensor, scores: Tensor, coarse: Tensor, top: int, kind: str) -> list[Hit]:
        """The ``top`` best of ``rows`` (ascending) by full score; ``torch.sort`` is stable, so ties keep index order."""
        order = torch.sort(scores, descending=True, stable=True).indices[:top]
        return [Hit(rank + 1, int(rows[j]), float(scores[j]), float(coarse[j]), int(rows[j]) if kind == "image" else -1)
                for rank, j in enumerate(order.tolist())]
