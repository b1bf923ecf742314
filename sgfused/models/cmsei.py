"""CMSEI (Ge et al., WACV 2023): cross-modal semantic enhanced interaction for image-sentence retrieval.

What. Regions are projected (FC 2048 -> d) and enhanced by two relationship-aware
GCNs with residuals (Eq. 1-2): an explicit *spatial* graph (edge ``i - j`` kept where
the IoU of the two boxes exceeds ``iou_threshold`` = mu, weighted by the learnt
semantic similarity ``(W_phi v_i) . (W_varphi v_j)``) and an explicit *semantic
relation* graph (1 where the visual scene graph relates the two regions). Words (a
bi-GRU, or a locally stored BERT) are enhanced by an implicit fully connected graph
(Eq. 3-4). Every (image, caption) pair then runs the local-local interaction (Eq.
5-7: cosine fragment similarities, lambda-smoothed softmax, attended vectors,
conditional fusion) twice and the local-global interaction (Eq. 8-9); the score is
the cosine of the averaged fragments with the other modality's global feature.
``direction="i2t"`` enhances the regions of each pair (attending over the words),
``"t2i"`` the words (attending over the regions); the paper's starred results are
the average of one model of each direction (``sgfused eval-ensemble``).

Why batched this way. The graphs depend on one modality only, so they run in
:meth:`CMSEI.encode_images` / :meth:`CMSEI.encode_captions` (evaluation encodes each
image and caption once). The first interaction round is one
:func:`sgfused.ops.cross_attention` call (``norm="none"`` on unit vectors, so the
scores are Eq. 5's cosines; ``epilogue="context"`` gives the attended vectors) for
all pairs of a tile; the second round's queries already depend on the pair, so it
is a batched attention over the tile's pairs (:func:`paired_attention`) with the same
math. No Python loop runs over captions: :meth:`CMSEI.similarity` walks tiles of
captions x images.

Memory bound. A tile holds at most ``chunk_fragments`` pair fragments (pair x
query position: regions for i2t, words for t2i), but at least one image and one
caption; its per-pair tensors are about eight ``(fragments, d)`` fp32 tensors plus
the ``(fragments, context length)`` attention, so evaluation needs about
``chunk_fragments * (8 d + L_context) * 4`` bytes beyond the encodings and the score
matrix, whatever the numbers of images and captions (default ``chunk_fragments``:
16 Ki on the CPU = about 0.5 GiB at d = 1024, 128 Ki on a GPU = about 4 GiB).
In training every tile's graph stays alive for backward (a batch of 64 x 64 pairs
is ``64 * 64 * 36`` fragments).

Choices where the paper is silent (its closest relatives decide):

* Edge weights. The printed similarities ``(W_phi V)^T (W_varphi V)`` (Eq. 1, 3) are
  divided by the number of nodes, as VSRN's Rs-GCN (the paper's ref. [21]) does, so
  the propagation does not grow with the node count; padded words take no part in
  the textual graph. The spatial graph keeps its diagonal (IoU 1 > mu). The relation
  graph is symmetric (an undirected association, Fig. 1) and averaged over each
  region's related regions (a region without relations gets zero, so Eq. 2 reduces
  to ``(V^s) W_r3 + V``). Its nodes are ``V^s``, as the text says (Eq. 2 prints
  ``V``). The GCN layers are linear as printed (no activation), with biases.
* Features. Region and word features are l2-normalised after projection (SCAN /
  SGRAF); the globals ``V_bar`` / ``T_bar`` average the projected features (Sec. 3.1).
* Attention (Eq. 5-7). Cosines of the enhanced fragments, softmax with temperature
  ``lambda_softmax`` (9, SCAN / SGRAF's ``lambda``) over the other modality's valid
  fragments; the attended vector ``q`` is the l2-normalised weighted sum of the
  *unit* context fragments (SGRAF's attention output, the op's contract). The two
  rounds have their own fusion weights; the second attends with the first round's
  output over the same context fragments.
* Local-global gate (Eq. 8). ``r_i`` is one number per fragment ("the relative
  importance of each object"): ``sigmoid(sum(W^r v_i^t * T_bar))``, the sum of the
  printed Hadamard product.
* Score. ``cos(mean_i v^o_i, T_bar)`` for i2t, ``cos(mean_j t^o_j, V_bar)`` for t2i
  (valid words only), as Sec. 3.3 ends.
* BERT (``text_encoder="bert"``), as VSE-infinity and CHAN do: a pre-trained BERT read
  from the local folder ``bert_path`` (never downloaded), its last hidden states
  mapped 768 -> d by a linear layer, its own parameters at 0.1x the base learning
  rate (:meth:`CMSEI.parameter_groups`). Word pieces come from the same folder's
  tokenizer (:mod:`sgfused.data.wordpiece`); each word is the mean of its pieces, so
  word positions (and caption graphs) stay those of the bi-GRU path.
* Recipes (``configs/cmsei_*.json``): Sec. 4.2 (Adam 2e-4, x0.1 every 15 epochs, 30
  epochs, batch 64, margin 0.2, mu 0.4, d 1024); max violation as VSE++ / SGRAF; word
  dimension 300 and gradient clipping 2.0 from SGRAF.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data.batch import CaptionBatch, ImageBatch
from ..data.vocab import Vocabulary
from ..ops import cross_attention
from ..reference import l2norm
from .base import RetrievalModel
from .caption_chunks import check_lengths, check_token_ids
from .encoders import GRUTextEncoder, RegionEncoder, valid_mask
from .graph_layers import neighbour_mean, xavier_init
from .registry import register_model

DIRECTIONS = ("i2t", "t2i")
TEXT_ENCODERS = ("bigru", "bert")
BERT_LR_SCALE = 0.1  # VSE-infinity / CHAN: the pre-trained BERT trains at a tenth of the base learning rate
# Pair fragments per tile of similarity(), by device type (module doc: the memory bound).
CHUNK_FRAGMENTS = {"cpu": 1 << 14, "cuda": 1 << 17}
ImageEncoding = tuple[Tensor, Tensor, Tensor]  # enhanced V^f (I, K, d), projected V (I, K, d), global V_bar (I, d)
CaptionEncoding = tuple[Tensor, Tensor, Tensor, Tensor]  # T^f (C, L, d), T (C, L, d), lengths (C,), T_bar (C, d)


# ---------------------------------------------------------------------------- graphs (Eq. 1-4)
def box_iou(boxes: Tensor) -> Tensor:
    """IoU ``(B, K, K)`` of every pair of boxes ``(B, K, 4)`` (x1 y1 x2 y2); 0 where both are empty."""
    top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    return inter / union.clamp(min=1e-12)


def relation_adjacency(graphs: Sequence[Any], n_regions: int, device: torch.device) -> Tensor:
    """``A^v (B, K, K)``: 1 where a scene-graph relation joins regions i and j (either way), 0 elsewhere."""
    batch, rows, cols = [], [], []
    for b, graph in enumerate(graphs):
        rels = graph.get("rels") if isinstance(graph, dict) else None
        if not isinstance(rels, list):
            raise ValueError(f"image graph {b}: expected a dict with a 'rels' list of [subject, predicate, object], "
                             f"got {type(graph).__name__} {graph!r:.60}")
        for rel in rels:
            ends = (rel[0], rel[2]) if isinstance(rel, (list, tuple)) and len(rel) == 3 else None
            if ends is None or not all(isinstance(e, int) and 0 <= e < n_regions for e in ends):
                raise ValueError(f"image graph {b}: relation {rel!r} must be [subject, predicate, object] with "
                                 f"subject and object region indices in [0, {n_regions})")
            batch += [b, b]
            rows += [ends[0], ends[1]]
            cols += [ends[1], ends[0]]
    adjacency = torch.zeros(len(graphs), n_regions, n_regions)
    adjacency[batch, rows, cols] = 1.0
    return adjacency.to(device)


class SimilarityEdges(nn.Module):
    """``(W_phi x_i) . (W_varphi x_j) / n`` for every node pair (Eq. 1's ``Sim^s``, Eq. 3's ``A^t``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.phi = nn.Linear(dim, dim)
        self.varphi = nn.Linear(dim, dim)

    def forward(self, nodes: Tensor, counts: Tensor) -> Tensor:
        """``nodes (B, N, d)``, ``counts (B,)`` valid nodes -> ``(B, N, N)``."""
        return self.phi(nodes) @ self.varphi(nodes).transpose(1, 2) / counts.to(nodes)[:, None, None]


class SpatialGraphConv(nn.Module):
    """Eq. 1: ``V^s = (A^s V W_g^s) W_r1 + V`` with ``A^s`` the similarity edges where IoU > mu."""

    def __init__(self, dim: int, iou_threshold: float) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.edges = SimilarityEdges(dim)
        self.gcn = nn.Linear(dim, dim)  # W_g^s
        self.residual = nn.Linear(dim, dim)  # W_r1

    def adjacency(self, regions: Tensor, boxes: Tensor) -> Tensor:
        counts = torch.full(regions.shape[:1], regions.shape[1], device=regions.device)
        return self.edges(regions, counts).masked_fill(box_iou(boxes) <= self.iou_threshold, 0.0)

    def forward(self, regions: Tensor, boxes: Tensor) -> Tensor:
        return self.residual(self.adjacency(regions, boxes) @ self.gcn(regions)) + regions


class RelationGraphConv(nn.Module):
    """Eq. 2: ``V^f = ((A^v V^s W_g^v) W_r2 + V^s) W_r3 + V``, ``A^v`` averaged over each region's relations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gcn = nn.Linear(dim, dim)  # W_g^v
        self.residual = nn.Linear(dim, dim)  # W_r2
        self.out = nn.Linear(dim, dim)  # W_r3

    def forward(self, spatial: Tensor, regions: Tensor, adjacency: Tensor) -> Tensor:
        related, _ = neighbour_mean(adjacency, self.gcn(spatial))
        return self.out(self.residual(related) + spatial) + regions


class TextGraphConv(nn.Module):
    """Eq. 3-4: ``T^f = (A^t T W_g^t) W_rt + T`` over the fully connected graph of the valid words."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.edges = SimilarityEdges(dim)
        self.gcn = nn.Linear(dim, dim)  # W_g^t
        self.residual = nn.Linear(dim, dim)  # W_rt

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        valid = valid_mask(lengths, words.shape[1])
        pairs = valid[:, :, None] & valid[:, None, :]
        adjacency = self.edges(words, lengths).masked_fill(~pairs, 0.0)
        out = self.residual(adjacency @ self.gcn(words)) + words
        return out.masked_fill(~valid[..., None], 0.0)


# ---------------------------------------------------------------------------- interaction (Eq. 5-9)
def paired_attention(queries: Tensor, contexts: Tensor, context_valid: Tensor, smooth: float) -> Tensor:
    """Each pair's query fragments attend over that pair's context fragments (Eq. 5-6, second round).

    ``queries (C, I, Lq, d)``; ``contexts`` and ``context_valid`` broadcast to ``(C, I, Lc, d)`` /
    ``(C, I, Lc)``. Returns the l2-normalised attended vectors ``(C, I, Lq, d)``, the math of
    ``cross_attention(norm="none", epilogue="context")`` on unit inputs.
    """
    unit = l2norm(contexts)
    cosines = l2norm(queries) @ unit.transpose(-1, -2)  # (C, I, Lq, Lc)
    weights = torch.softmax((smooth * cosines).masked_fill(~context_valid[..., None, :], float("-inf")), dim=-1)
    return l2norm(weights @ unit)


class ConditionalFusion(nn.Module):
    """Eq. 7: ``x' = ReLU(W_1 (x * tanh(W_2 q) + W_3 q)) + x``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, fragments: Tensor, attended: Tensor) -> Tensor:
        return F.relu(self.w1(fragments * torch.tanh(self.w2(attended)) + self.w3(attended))) + fragments


class LocalGlobalGate(nn.Module):
    """Eq. 8-9: ``x^o = r x^t + x^t + ReLU(x)`` with ``r = sigmoid(sum(W^r x^t * g))`` per fragment."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Linear(dim, dim)  # W^r

    def forward(self, enhanced: Tensor, original: Tensor, other_global: Tensor) -> Tensor:
        importance = torch.sigmoid((self.weight(enhanced) * other_global).sum(-1, keepdim=True))
        return importance * enhanced + enhanced + F.relu(original)


# ---------------------------------------------------------------------------- text encoders
class BertWordEncoder(nn.Module):
    """A locally stored BERT read per word: the mean of each word's pieces, mapped 768 -> ``embed_size``.

    ``bert_path`` holds the model and its tokenizer (``save_pretrained`` layout); nothing
    is downloaded. :meth:`set_vocabulary` builds the word-piece table of the caption
    vocabulary (:class:`sgfused.data.wordpiece.WordPieceTable`).
    """

    def __init__(self, bert_path: str, embed_size: int) -> None:
        super().__init__()
        from ..data.wordpiece import load_bert

        self.bert_path = bert_path
        self.bert, self.tokenizer = load_bert(bert_path)
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_size)
        xavier_init(self.fc)
        self.table: Any = None

    def set_vocabulary(self, vocab: Vocabulary) -> None:
        from ..data.wordpiece import WordPieceTable

        self.table = WordPieceTable(vocab, self.tokenizer)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        if self.table is None:
            raise RuntimeError("CMSEI with text_encoder='bert' needs model.set_vocabulary(vocab) (the captions' "
                               "Vocabulary) before encoding captions")
        pieces = self.table.pieces(ids, lengths)
        hidden = self.bert(input_ids=pieces.ids, attention_mask=pieces.mask).last_hidden_state
        return l2norm(self.fc(pieces.pool(hidden, ids.shape[1])))


# ---------------------------------------------------------------------------- the model
@register_model("cmsei")
class CMSEI(RetrievalModel):
    """Cross-modal Semantic Enhanced Interaction, one ``direction`` ("i2t" or "t2i") per model.

    Image encodings are ``(V^f, V, V_bar)``; caption encodings ``(T^f, T, lengths, T_bar)``
    (zero past each length). ``iou_threshold`` is the paper's mu, ``lambda_softmax``
    the attention temperature, ``chunk_fragments`` the tile size of :meth:`similarity`
    (default per device, :data:`CHUNK_FRAGMENTS`). ``text_encoder="bert"`` reads BERT
    from ``bert_path``; ``reference=True`` runs every op on the reference backend.
    """

    data_requirements = ("boxes", "image_graphs")

    def __init__(
        self,
        vocab_size: int,
        *,
        direction: str = "i2t",
        embed_size: int = 1024,
        word_dim: int = 300,
        img_dim: int = 2048,
        num_regions: int = 36,
        iou_threshold: float = 0.4,
        lambda_softmax: float = 9.0,
        margin: float = 0.2,
        max_violation: bool = True,
        text_encoder: str = "bigru",
        bert_path: str | None = None,
        num_layers: int = 1,
        chunk_fragments: int | None = None,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
        if (text_encoder == "bert") != (bert_path is not None):
            raise ValueError(f"bert_path must be given exactly when text_encoder='bert', got text_encoder="
                             f"{text_encoder!r} and bert_path={bert_path!r}")
        if bert_path is not None and not isinstance(bert_path, str):
            raise ValueError(f"bert_path must be a folder path (a string), got {bert_path!r}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1), got {iou_threshold}")
        if chunk_fragments is not None and chunk_fragments < 1:
            raise ValueError(f"chunk_fragments must be None or >= 1, got {chunk_fragments}")
        self.direction, self.embed_size, self.num_regions = direction, embed_size, num_regions
        self.lambda_softmax, self.chunk_fragments = float(lambda_softmax), chunk_fragments
        self.margin, self.max_violation, self.reference = float(margin), bool(max_violation), bool(reference)
        self.vocab_size = vocab_size
        self.image_encoder = RegionEncoder(img_dim, embed_size)
        self.spatial_gcn = SpatialGraphConv(embed_size, float(iou_threshold))
        self.relation_gcn = RelationGraphConv(embed_size)
        self.text_graph = TextGraphConv(embed_size)
        self.fusions = nn.ModuleList(ConditionalFusion(embed_size) for _ in range(2))  # Eq. 7, applied twice
        self.local_global = LocalGlobalGate(embed_size)
        xavier_init(self)  # before the text encoder: BERT keeps its pre-trained weights
        self.text_encoder: nn.Module
        if text_encoder == "bert":
            self.text_encoder = BertWordEncoder(bert_path, embed_size)
        else:
            self.text_encoder = GRUTextEncoder(vocab_size, word_dim, embed_size, num_layers)

    def set_vocabulary(self, vocab: Vocabulary) -> None:
        """The BERT encoder needs the words behind the token ids (word-piece table); the bi-GRU does not."""
        if isinstance(self.text_encoder, BertWordEncoder):
            if len(vocab) != self.vocab_size:
                raise ValueError(f"vocab: expected {self.vocab_size} words (the model's vocab_size), got {len(vocab)}")
            self.text_encoder.set_vocabulary(vocab)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: BERT's own parameters at ``BERT_LR_SCALE * lr``, everything else at ``lr``."""
        if not isinstance(self.text_encoder, BertWordEncoder):
            return super().parameter_groups(lr)
        bert = {id(p) for p in self.text_encoder.bert.parameters()}
        rest = [p for p in self.parameters() if id(p) not in bert]
        return [{"params": rest, "lr": lr},
                {"params": list(self.text_encoder.bert.parameters()), "lr": BERT_LR_SCALE * lr}]

    # ------------------------------------------------------------------ encoders
    def encode_image(self, features: Tensor, boxes: Tensor, graphs: Sequence[Any]) -> ImageEncoding:
        """Region features ``(B, K, img_dim)``, boxes ``(B, K, 4)`` and one visual scene graph per image."""
        if features.dim() != 3 or features.shape[1] != self.num_regions:
            raise ValueError(f"features must be (B, {self.num_regions}, img_dim) (num_regions = {self.num_regions}), "
                             f"got shape {tuple(features.shape)}")
        if boxes.shape != (*features.shape[:2], 4):
            raise ValueError(f"boxes must be (B, num_regions, 4) = {(*features.shape[:2], 4)}, got {tuple(boxes.shape)}")
        if not boxes.dtype.is_floating_point or not torch.isfinite(boxes).all():
            raise ValueError("boxes must be finite floating-point x1 y1 x2 y2, normalised by the image size")
        if len(graphs) != features.shape[0]:
            raise ValueError(f"expected one image graph per image ({features.shape[0]}), got {len(graphs)}")
        regions = self.image_encoder(features)
        spatial = self.spatial_gcn(regions, boxes.to(regions.dtype))
        adjacency = relation_adjacency(graphs, self.num_regions, regions.device).to(regions.dtype)
        return self.relation_gcn(spatial, regions, adjacency), regions, regions.mean(1)

    def encode_text(self, ids: Tensor, lengths: Tensor) -> CaptionEncoding:
        """Token ids ``(B, L)`` (``<start>`` ... ``<end>``) with lengths ``(B,)`` -> ``(T^f, T, lengths, T_bar)``."""
        check_token_ids(ids, lengths, self.vocab_size)
        words = self.text_encoder(ids, lengths)
        lengths = lengths.to(words.device)
        words = words.masked_fill(~valid_mask(lengths, ids.shape[1])[..., None], 0.0)
        mean = words.sum(1) / lengths[:, None].to(words)
        return self.text_graph(words, lengths), words, lengths, mean

    def encode_images(self, images: ImageBatch) -> ImageEncoding:
        if images.boxes is None:
            raise ValueError("CMSEI needs region boxes: load the split with boxes=True (CMSEI.data_requirements)")
        if images.graphs is None:
            raise ValueError("CMSEI needs visual scene graphs: load the split with image_graphs=True "
                             "(CMSEI.data_requirements)")
        return self.encode_image(images.features, images.boxes, images.graphs)

    def encode_captions(self, captions: CaptionBatch) -> CaptionEncoding:
        return self.encode_text(captions.ids, captions.lengths)

    # ------------------------------------------------------------------ similarity
    def _interact(self, fragments: Tensor, originals: Tensor, first_round: Tensor, contexts: Tensor,
                  context_valid: Tensor, other_global: Tensor) -> Tensor:
        """Fused fragments ``(C, I, Lq, d)`` of the tile's pairs after both rounds (Eq. 7) and Eq. 8-9."""
        enhanced = self.fusions[0](fragments, first_round)
        attended = paired_attention(enhanced, contexts, context_valid, self.lambda_softmax)
        enhanced = self.fusions[1](enhanced, attended)
        return self.local_global(enhanced, originals, other_global)

    def _tile_scores(self, images: ImageEncoding, captions: CaptionEncoding) -> Tensor:
        """Scores ``(C, I)`` of one tile of captions x images."""
        regions_f, regions, img_glo = images
        words_f, words, lengths, cap_glo = captions
        n_image, k = regions_f.shape[:2]
        region_lens = torch.full((n_image,), k, dtype=torch.long, device=regions_f.device)
        word_valid = valid_mask(lengths, words_f.shape[1])  # (C, L)
        if self.direction == "i2t":  # regions attend over words, per pair
            first = cross_attention(l2norm(regions_f), l2norm(words_f), query_lens=region_lens, context_lens=lengths,
                                    smooth=self.lambda_softmax, norm="none", epilogue="context",
                                    backend=self.backend).transpose(0, 1)  # (C, I, K, d)
            out = self._interact(regions_f[None], regions[None], first, words_f[:, None], word_valid[:, None],
                                 cap_glo[:, None, None])
            pooled, other = out.mean(2), cap_glo[:, None]
        else:  # words attend over regions, per pair
            first = cross_attention(l2norm(words_f), l2norm(regions_f), query_lens=lengths, context_lens=region_lens,
                                    smooth=self.lambda_softmax, norm="none", epilogue="context",
                                    backend=self.backend)  # (C, I, L, d)
            region_valid = torch.ones(1, n_image, k, dtype=torch.bool, device=regions_f.device)
            out = self._interact(words_f[:, None], words[:, None], first, regions_f[None], region_valid,
                                 img_glo[None, :, None])
            keep = word_valid[:, None, :, None]
            pooled = out.masked_fill(~keep, 0.0).sum(2) / lengths[:, None, None].to(out)
            other = img_glo[None]
        return F.cosine_similarity(pooled, other.expand_as(pooled), dim=-1, eps=1e-8)

    def similarity(self, images: ImageEncoding, captions: CaptionEncoding, *,
                   chunk_fragments: int | None = None) -> Tensor:
        """Scores ``(n_image, n_caption)`` in [-1, 1], tile by tile (module doc: the memory bound).

        A tile holds at most ``chunk_fragments`` pair fragments but at least one image
        and one caption; captions are sorted by length, each tile trimmed to its longest.
        """
        regions_f, regions, img_glo = self._check_image_encoding(images)
        words_f, words, lengths, cap_glo = self._check_caption_encoding(captions)
        lengths = lengths.to(words_f.device)
        budget = chunk_fragments or self.chunk_fragments or CHUNK_FRAGMENTS.get(regions_f.device.type, 1 << 17)
        host_lengths = lengths.tolist()
        order = sorted(range(len(host_lengths)), key=host_lengths.__getitem__)
        n_image, k = regions_f.shape[:2]
        per_image = k if self.direction == "i2t" else max(host_lengths)
        image_step = max(1, min(n_image, budget // per_image))
        rows = []
        for start in range(0, n_image, image_step):
            tile_images = (regions_f[start:start + image_step], regions[start:start + image_step],
                           img_glo[start:start + image_step])
            width = tile_images[0].shape[0]
            columns, begin = [], 0
            while begin < len(order):
                longest = host_lengths[order[begin]]
                end = begin + 1
                while end < len(order):
                    length = host_lengths[order[end]]
                    fragments = width * (k if self.direction == "i2t" else length)
                    if (end - begin + 1) * fragments > budget:
                        break
                    longest, end = length, end + 1
                index = torch.tensor(order[begin:end], device=words_f.device)
                tile_captions = (words_f[index, :longest], words[index, :longest], lengths[index], cap_glo[index])
                columns.append(self._tile_scores(tile_images, tile_captions))
                begin = end
            rows.append(torch.cat(columns))
        inverse = torch.argsort(torch.tensor(order, device=words_f.device))
        return torch.cat(rows, dim=1).index_select(0, inverse).t()

    # ------------------------------------------------------------------ checks
    def _check_image_encoding(self, images: Any) -> ImageEncoding:
        if not isinstance(images, tuple) or len(images) != 3:
            raise TypeError("images must be the (V^f, V, V_bar) encoding of encode_images / encode_image")
        enhanced, regions, glob = images
        k, d = self.num_regions, self.embed_size
        if enhanced.dim() != 3 or enhanced.shape[1:] != (k, d) or regions.shape != enhanced.shape \
                or glob.shape != (enhanced.shape[0], d):
            raise ValueError(f"image encoding must be V^f and V (n_image, {k}, {d}) and V_bar (n_image, {d}), got "
                             f"{tuple(enhanced.shape)}, {tuple(regions.shape)} and {tuple(glob.shape)}")
        if enhanced.shape[0] == 0:
            raise ValueError("need at least one image, got an empty image encoding")
        return enhanced, regions, glob

    def _check_caption_encoding(self, captions: Any) -> CaptionEncoding:
        if not isinstance(captions, tuple) or len(captions) != 4:
            raise TypeError("captions must be the (T^f, T, lengths, T_bar) encoding of encode_captions / encode_text")
        enhanced, words, lengths, glob = captions
        d = self.embed_size
        if enhanced.dim() != 3 or enhanced.shape[2] != d or words.shape != enhanced.shape \
                or lengths.shape != enhanced.shape[:1] or glob.shape != (enhanced.shape[0], d):
            raise ValueError(f"caption encoding must be T^f and T (n_caption, L, {d}), lengths (n_caption,) and T_bar "
                             f"(n_caption, {d}), got {tuple(enhanced.shape)}, {tuple(words.shape)}, "
                             f"{tuple(lengths.shape)} and {tuple(glob.shape)}")
        if enhanced.shape[0] == 0:
            raise ValueError("need at least one caption, got an empty caption encoding")
        check_lengths(lengths, enhanced.shape[1])
        return enhanced, words, lengths, glob
