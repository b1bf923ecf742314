"""SGM (Wang et al., WACV 2020): cross-modal scene graph matching, the paper's Eq. 1-9.

What. An image is its visual scene graph (VSG): object nodes (object ``i`` of the graph is
region ``i``) and relation nodes (one per ``[subject, predicate, object]`` of its ``rels``).
A caption is its textual scene graph (TSG): its words and its relation triplets.

1. Visual encoder (MGCN, Eq. 1-3, :class:`VisualGraphEncoder`): every node's visual
   feature (the object's region; a relation's union-box feature) is concatenated with the
   300-d embedding of its label (object class or predicate; separate tables ``W_o``, ``W_r``)
   and fused, ``u = tanh(W_u [v; e])`` (one ``W_u`` for both kinds, ``img_dim -> img_dim`` as
   the paper's ``W_u in R^{d1 x (d1 + d2)}``); then ``gcn_layers`` (1) GCN layers update an
   object from itself, ``h_o = tanh(g_o(h_o))``, and a relation from its subject, itself and
   its object, ``h_r = tanh(g_r([h_s; h_r; h_o]))``. The first layer maps ``img_dim`` to
   ``embed_size``.
2. Text encoder (Eq. 4-5, :class:`TextGraphEncoder`): a word-level bi-GRU over the caption
   (directions averaged) gives the object-level nodes (every token, ``<start>``/``<end>``
   included, as the other models' word nodes); a path-level bi-GRU over each relation
   triplet's three words (subject, predicate, object) keeps its last state (the two
   directions' final states averaged) as a relation-level node.
3. Score (Eq. 6-7) ``S = S_o + lambda * S_r`` (``lambda = 1``, the paper's ``S = S^o + S^r``):
   each level is :func:`sgfused.ops.max_sim` of the caption's nodes against the image's
   nodes (every caption node takes its best image node, the caption's score is their mean).
   Loss: the in-batch hardest-negative triplet loss (Eq. 9) of :class:`RetrievalModel`.

Because both encoders are independent, evaluation encodes each image and caption once and
scores all pairs with two ``max_sim`` calls; ``reference=True`` runs them (and the loss) on
:mod:`sgfused.reference`.

Choices where the paper is silent (each following the facts about the authors' released
code in the issue where there are any):

* The sentence's final state (the word GRU's two final states averaged) is appended to a
  caption's relation nodes, so a caption without relations still has a relation-level
  score.
* Relation features: ``ImageBatch.relation_features`` (the optional ``{split}_ims_rels.npy``,
  row ``r`` = relation ``r`` of the image's graph). Without it the relation's visual feature
  falls back to the mean of its subject and object region features (the union box covers
  both regions; the mean is the closest stand-in from the features at hand), and the model
  warns once.
* Labels are strings; a label or predicate is embedded as the mean of the label table's
  rows of ``tokenize(label)`` over the captions' vocabulary (unknown words: ``<unk>``), so
  :meth:`SGM.set_vocabulary` must run before images are encoded (the trainer and checkpoints
  do it). The paper initialises the tables with word2vec; here they start uniform in
  +-0.1 like the caption word embedding (no pretrained vectors are shipped).
* Nodes are l2-normalised before ``max_sim`` (the paper writes the plain dot product of
  tanh outputs; with cosines the margin 0.2 has its usual VSE++ scale and ``S_o``, ``S_r``
  weigh alike).
* Relation nodes of an image are padded to ``max_relations`` (25, the paper's ``N_r``), so
  the encodings of all batches have one width; a graph with more relations is an error.
  An image without relations gets one zero relation node: its ``S_r`` is 0 for every
  caption.
* Only the regions holding the graph's objects (``len(labels)``) are object nodes; the rest
  are padding. A relation end outside them is an error naming the image and the relation.
"""

from __future__ import annotations

import warnings
from itertools import accumulate
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..data.batch import CaptionBatch, ImageBatch
from ..data.graphs import validate_caption_graph, validate_image_graph
from ..data.vocab import UNK, Vocabulary, tokenize
from ..ops import max_sim
from ..reference import l2norm
from .base import RetrievalModel
from .graph_layers import xavier_init
from .registry import register_model

ImageEncoding = tuple[Tensor, Tensor, Tensor, Tensor]  # objects (I, R, d), object counts (I,), relations (I, N_r, d), counts (I,)
CaptionEncoding = tuple[Tensor, Tensor, Tensor, Tensor]  # words (C, L, d), lengths (C,), relations (C, P + 1, d), counts (C,)
FALLBACK_MESSAGE = (
    "SGM: the images carry no relation features ({split}_ims_rels.npy is absent or relation_features=False): "
    "each relation's visual feature is the mean of its subject and object region features"
)


class LabelEmbedding(nn.Module):
    """Label strings -> ``(n, word_dim)``: the mean of the table's rows of the label's words (module doc)."""

    def __init__(self, vocab_size: int, word_dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.table.weight, -0.1, 0.1)
        self.vocabulary: Vocabulary | None = None
        self._word_ids: dict[str, list[int]] = {}

    def set_vocabulary(self, vocab: Vocabulary) -> None:
        self.vocabulary, self._word_ids = vocab, {}

    def forward(self, labels: Sequence[str]) -> Tensor:
        if self.vocabulary is None:
            raise RuntimeError("SGM needs the vocabulary to embed visual-graph labels: call "
                               "model.set_vocabulary(vocab) (with the captions' Vocabulary) before encoding images")
        if not labels:
            return self.table.weight.new_zeros(0, self.table.embedding_dim)
        ids, offsets = [], []
        for label in labels:
            if not isinstance(label, str):
                raise ValueError(f"SGM embeds the words of visual-graph labels and predicates; got the non-string "
                                 f"label {label!r} (map class ids to their names first)")
            if label not in self._word_ids:
                self._word_ids[label] = [self.vocabulary(w) for w in tokenize(label)] or [self.vocabulary(UNK)]
            offsets.append(len(ids))
            ids.extend(self._word_ids[label])
        device = self.table.weight.device
        return F.embedding_bag(torch.tensor(ids, dtype=torch.long, device=device), self.table.weight,
                               torch.tensor(offsets, dtype=torch.long, device=device), mode="mean")


class VisualGraphEncoder(nn.Module):
    """MGCN (Eq. 1-3): label fusion, then GCN layers (objects from themselves, relations from ``[h_s; h_r; h_o]``)."""

    def __init__(self, vocab_size: int, img_dim: int, word_dim: int, embed_size: int, gcn_layers: int) -> None:
        super().__init__()
        self.object_labels = LabelEmbedding(vocab_size, word_dim)  # W_o
        self.predicate_labels = LabelEmbedding(vocab_size, word_dim)  # W_r
        self.fusion = nn.Linear(img_dim + word_dim, img_dim)  # W_u, shared by both node kinds
        dims = [img_dim] + [embed_size] * gcn_layers
        self.object_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))  # g_o
        self.relation_layers = nn.ModuleList(nn.Linear(3 * a, b) for a, b in zip(dims, dims[1:]))  # g_r
        xavier_init(self)

    def forward(self, objects: Tensor, object_labels: Tensor, relations: Tensor, relation_labels: Tensor,
                subjects: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The nodes of a batch's graphs packed together: ``objects (n_o, img_dim)``, ``relations (n_r, img_dim)``,
        their label embeddings, and each relation's subject / object row in ``objects`` ``(n_r,)``
        -> object nodes ``(n_o, d)`` and relation nodes ``(n_r, d)``."""
        h_o = torch.tanh(self.fusion(torch.cat([objects, object_labels], dim=-1)))
        h_r = torch.tanh(self.fusion(torch.cat([relations, relation_labels], dim=-1)))
        for g_o, g_r in zip(self.object_layers, self.relation_layers):
            h_o, h_r = torch.tanh(g_o(h_o)), torch.tanh(g_r(torch.cat([h_o[subjects], h_r, h_o[targets]], dim=-1)))
        return h_o, h_r


class TextGraphEncoder(nn.Module):
    """Word-level bi-GRU (word nodes, and the sentence's final state) and path-level bi-GRU (Eq. 4-5)."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.word_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)
        self.path_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)

    def words(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Word nodes ``(C, L, d)`` (directions averaged, zero past each length) and the final state ``(C, d)``."""
        packed = pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.word_rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        forward, backward = out.chunk(2, dim=-1)
        return (forward + backward) / 2, last[-2:].mean(dim=0)

    def paths(self, triplet_ids: Tensor) -> Tensor:
        """``(T, 3)`` word ids of subject, predicate, object -> ``(T, d)``: the two directions' last states averaged."""
        _, last = self.path_rnn(self.embed(triplet_ids))
        return last[-2:].mean(dim=0)


@register_model("sgm")
class SGM(RetrievalModel):
    """Scene Graph Matching: MGCN image graph, two-GRU caption graph, object- plus relation-level ``max_sim``.

    Options: ``img_dim`` (2048), ``embed_size`` (1024), ``word_dim`` (300), GRU ``num_layers``
    (1), ``gcn_layers`` (1), ``max_relations`` (25, relation nodes per image), ``relation_weight``
    lambda (1), ``margin`` (0.2), ``max_violation`` (True), ``reference`` (False: the ops'
    fused backends). Call :meth:`set_vocabulary` before encoding images.
    """

    data_requirements = ("image_graphs", "caption_graphs", "relation_features")

    def __init__(
        self,
        vocab_size: int,
        *,
        img_dim: int = 2048,
        embed_size: int = 1024,
        word_dim: int = 300,
        num_layers: int = 1,
        gcn_layers: int = 1,
        max_relations: int = 25,
        relation_weight: float = 1.0,
        margin: float = 0.2,
        max_violation: bool = True,
        reference: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("gcn_layers", gcn_layers), ("max_relations", max_relations), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SGM: {name} must be an int >= 1, got {value!r}")
        self.img_dim, self.embed_size, self.max_relations = img_dim, embed_size, max_relations
        self.relation_weight = float(relation_weight)
        self.margin, self.max_violation, self.reference = float(margin), bool(max_violation), bool(reference)
        self.visual = VisualGraphEncoder(vocab_size, img_dim, word_dim, embed_size, gcn_layers)
        self.text = TextGraphEncoder(vocab_size, word_dim, embed_size, num_layers)
        self._warned_fallback = False

    def set_vocabulary(self, vocab: Any) -> None:
        """The captions' vocabulary: visual labels are embedded through its word ids (module doc)."""
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"vocab must be a sgfused.data.vocab.Vocabulary, got {type(vocab).__name__}")
        size = self.text.embed.num_embeddings
        if len(vocab) != size:
            raise ValueError(f"vocab has {len(vocab)} words but the model's word embedding has {size} (vocab_size)")
        self.visual.object_labels.set_vocabulary(vocab)
        self.visual.predicate_labels.set_vocabulary(vocab)

    # ------------------------------------------------------------------ images
    def encode_image(self, features: Tensor, graphs: Sequence[dict] | None, relation_features: Tensor | None = None,
                     image_ids: Sequence[int] | None = None) -> ImageEncoding:
        """Region features ``(I, R, img_dim)``, one visual graph per image and optional relation features
        ``(I, R_rel, img_dim)`` -> l2-normalised object nodes, their counts, relation nodes, their counts.

        ``image_ids`` name the images in errors (default: their position in the batch).
        """
        if features.dim() != 3 or features.shape[2] != self.img_dim or not features.shape[0]:
            raise ValueError(f"features must be (I >= 1, R, {self.img_dim}) (img_dim), got shape {tuple(features.shape)}")
        n_images, n_regions, _ = features.shape
        if graphs is None or len(graphs) != n_images:
            raise ValueError(f"SGM needs one visual scene graph per image ({n_images}), got "
                             f"{'none' if graphs is None else len(graphs)} (load the split with image_graphs=True)")
        ids = list(image_ids) if image_ids is not None else list(range(n_images))
        rows = relation_features.shape[1] if relation_features is not None else None
        if relation_features is not None and (relation_features.dim() != 3 or relation_features.shape[0] != n_images
                                              or relation_features.shape[2] != self.img_dim):
            raise ValueError(f"relation_features must be ({n_images}, R_rel, {self.img_dim}), got {tuple(relation_features.shape)}")
        for graph, image in zip(graphs, ids):
            self._check_image_graph(graph, image, n_regions, rows)
        if relation_features is None and not self._warned_fallback:
            warnings.warn(FALLBACK_MESSAGE, stacklevel=2)
            self._warned_fallback = True
        # Only the graphs' nodes are computed, packed image by image (padded slots would be masked anyway).
        device = features.device
        counts = [len(g["labels"]) for g in graphs]
        first = [0, *accumulate(counts)]  # each image's first row among the packed objects
        obj_image, obj_slot = _positions(counts, device)
        rel_image, rel_slot = _positions([len(g["rels"]) for g in graphs], device)
        ends = torch.tensor([[first[b] + r[0], first[b] + r[2]] for b, g in enumerate(graphs) for r in g["rels"]],
                            dtype=torch.long, device=device).reshape(-1, 2)
        objects = features[obj_image, obj_slot]
        if relation_features is None:
            relations = (objects[ends[:, 0]] + objects[ends[:, 1]]) / 2
        else:
            relations = relation_features[rel_image, rel_slot]
        object_labels = self.visual.object_labels([label for g in graphs for label in g["labels"]]).to(features.dtype)
        relation_labels = self.visual.predicate_labels([r[1] for g in graphs for r in g["rels"]]).to(features.dtype)
        h_o, h_r = self.visual(objects, object_labels, relations, relation_labels, ends[:, 0], ends[:, 1])
        object_nodes = h_o.new_zeros(n_images, n_regions, self.embed_size).index_put((obj_image, obj_slot), l2norm(h_o))
        relation_nodes = h_r.new_zeros(n_images, self.max_relations, self.embed_size).index_put((rel_image, rel_slot), l2norm(h_r))
        n_rels = torch.bincount(rel_image, minlength=n_images)
        # an image without relations keeps one zero relation node (module doc)
        return object_nodes, torch.tensor(counts, device=device), relation_nodes, n_rels.clamp(min=1)

    def _check_image_graph(self, graph: dict, image: int, n_regions: int, rows: int | None) -> None:
        """Clear errors for relations SGM cannot encode, then the layout checks of :mod:`sgfused.data.graphs`."""
        labels, rels = graph.get("labels"), graph.get("rels")
        if isinstance(labels, list) and not labels:
            raise ValueError(f"SGM: image {image} has a visual graph without objects (it needs at least one)")
        if isinstance(labels, list) and isinstance(rels, list):
            for k, rel in enumerate(rels):
                ends = [rel[0], rel[2]] if isinstance(rel, list) and len(rel) == 3 else []
                bad = [e for e in ends if not isinstance(e, int) or not 0 <= e < len(labels)]
                if bad:
                    raise ValueError(f"SGM: image {image} relation {k} {rel} points at object {bad[0]}, but its graph has "
                                     f"{len(labels)} objects (regions {len(labels)}..{n_regions - 1} are padding)")
            if len(rels) > self.max_relations:
                raise ValueError(f"SGM: image {image} has {len(rels)} relations, more than max_relations={self.max_relations}")
            if rows is not None and len(rels) > rows:
                raise ValueError(f"SGM: image {image} relation {rows} {rels[rows]} has no row in relation_features "
                                 f"({rows} rows per image)")
        validate_image_graph(graph, n_regions, f"SGM: image {image} graph")

    # ------------------------------------------------------------------ captions
    def encode_text(self, ids: Tensor, lengths: Tensor, graphs: Sequence[dict] | None) -> CaptionEncoding:
        """Token ids ``(C, L)``, lengths ``(C,)`` and one caption graph per caption -> l2-normalised word nodes,
        lengths, relation nodes ``(C, P + 1, d)`` (the triplets, then the sentence's final state) and their counts."""
        if ids.dim() != 2 or lengths.shape != ids.shape[:1] or not ids.shape[0]:
            raise ValueError(f"ids must be (C >= 1, L) and lengths (C,), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
        if ids.is_floating_point() or lengths.is_floating_point():
            raise TypeError(f"ids and lengths must be integer tensors, got {ids.dtype} and {lengths.dtype}")
        if int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]:
            raise ValueError(f"lengths must lie in [1, {ids.shape[1]}] (the padded length), got "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        vocab_size = self.text.embed.num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"ids must lie in [0, {vocab_size}) (vocab_size), got [{int(ids.min())}, {int(ids.max())}]")
        n_captions = ids.shape[0]
        if graphs is None or len(graphs) != n_captions:
            raise ValueError(f"SGM needs one caption graph per caption ({n_captions}), got "
                             f"{'none' if graphs is None else len(graphs)} (load the split with caption_graphs=True)")
        host_lengths = lengths.tolist()
        for c, graph in enumerate(graphs):
            validate_caption_graph(graph, max(host_lengths[c] - 2, 0), f"SGM: caption graphs[{c}]")
        lengths = lengths.to(ids.device)
        words, sentence = self.text.words(ids, lengths)
        counts = [len(g["relations"]) for g in graphs]
        relations = words.new_zeros(n_captions, max(counts) + 1, self.embed_size)
        caption = torch.arange(n_captions, device=ids.device)
        relations = relations.index_put((caption, torch.tensor(counts, device=ids.device)), sentence)
        triplets = [(c, k, rel) for c, g in enumerate(graphs) for k, rel in enumerate(g["relations"])]
        if triplets:
            where = torch.tensor([(c, k) for c, k, _ in triplets], device=ids.device)
            positions = torch.tensor([[p + 1 for p in rel] for _, _, rel in triplets], device=ids.device)  # p -> ids[p + 1]
            paths = self.text.paths(ids[where[:, 0, None], positions])
            relations = relations.index_put((where[:, 0], where[:, 1]), paths)
        n_rels = torch.tensor(counts, device=ids.device) + 1
        return l2norm(words), lengths, l2norm(relations), n_rels

    def encode_images(self, images: ImageBatch) -> ImageEncoding:
        return self.encode_image(images.features, images.graphs, images.relation_features, images.index.tolist())

    def encode_captions(self, captions: CaptionBatch) -> CaptionEncoding:
        return self.encode_text(captions.ids, captions.lengths, captions.graphs)

    # ------------------------------------------------------------------ similarity
    def similarity(self, images: ImageEncoding, captions: CaptionEncoding) -> Tensor:
        """``S = S_o + lambda * S_r`` ``(n_images, n_captions)``: two :func:`sgfused.ops.max_sim` calls."""
        objects, n_objects, image_rels, n_image_rels = _check_encoding(images, "images", self.embed_size)
        words, n_words, caption_rels, n_caption_rels = _check_encoding(captions, "captions", self.embed_size)
        # Under autocast the image side (Linear layers) and the text side (GRUs) may differ in dtype.
        dtype = torch.promote_types(objects.dtype, words.dtype)
        s_o = max_sim(objects.to(dtype), words.to(dtype), n_objects, n_words, backend=self.backend)
        s_r = max_sim(image_rels.to(dtype), caption_rels.to(dtype), n_image_rels, n_caption_rels, backend=self.backend)
        return s_o + self.relation_weight * s_r


def _positions(counts: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(item, slot)`` int64 index pairs of ``counts[b]`` slots per item ``b``, item by item."""
    item = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    first = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)[:-1]
    return item.to(device), (torch.arange(len(item)) - first[item]).to(device)


def _check_encoding(encoding: Any, name: str, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four parts of an SGM encoding, with a clear error for anything else."""
    if not isinstance(encoding, tuple) or len(encoding) != 4:
        raise TypeError(f"{name} must be the 4-part SGM encoding of encode_{name} (nodes, counts, relation nodes, counts)")
    nodes, counts, rels, rel_counts = encoding
    for part, lens in ((nodes, counts), (rels, rel_counts)):
        if part.dim() != 3 or part.shape[2] != dim or lens.shape != part.shape[:1]:
            raise ValueError(f"{name}: encoding parts must be (N, L, {dim}) with (N,) counts, got "
                             f"{tuple(part.shape)} and {tuple(lens.shape)}")
    return nodes, counts, rels, rel_counts
