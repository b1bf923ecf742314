"""SGFN (Wang, Shang and Chen, 2022): scene-graph fusion network, the paper's Eq. 1-17.

What. Regions (a linear layer over the region features) and words (a bi-GRU) are the
object-layer nodes of their modality's scene graph, plus one global agent node per
graph, initialised to the all-ones vector and connected to every node (it reads them all,
and they read it).

1. Intra-modal hierarchical attention fusion (Eq. 1-5, :class:`HierarchicalFusion`):
   an object layer of 8-head graph attention over neighbouring objects, a relation
   layer and an attribute layer (an MLP over the mean of the adjacent relation /
   attribute nodes), mixed with softmax weights of the learnable ``alpha, beta``
   (initially 5 and 0). It gives ``F'``, ``P'`` and the agents ``c_R``, ``c_T``.
2. Cross-modal fusion with contextual vectors (Eq. 6-12, :class:`ContextualCrossFusion`):
   for every (image, caption) pair an MLP over ``[c_R || c_T]`` gives the contextual
   vectors, the pair's stacked regions and words attend jointly with queries and keys
   gated by them (plus a residual), and the pooled results update the agents.
   ``cross_layers`` such layers run in sequence (default 1).
3. Score ``S = S_G + delta * S_L`` (``delta = 0.3``): ``S_G`` the cosine of the two agents
   (Eq. 13), ``S_L`` the mean region->word plus the mean word->region alignment cosine
   (Eq. 14-17). Loss: the in-batch hardest-negative triplet loss, margin 0.2.

``fusion`` selects the paper's ablations: ``"full"``; ``"intra"`` (SGFN-intraF: no
cross-modal layers, scores from ``F'``, ``P'``, ``c_R``, ``c_T``); ``"cross"`` (SGFN-crossF:
no graph fusion, so ``F' = F``, ``P' = P`` and both agents stay all-ones).

Why it is built this way. SGFN is a cross-encoder: after step 2 every feature depends
on the pair, so all ``n_image x n_caption`` pairs are computed as broadcast tensors
(no Python loop over pairs), in chunks of captions so a chunk's per-pair tensors hold at
most :data:`PAIR_CHUNK_ELEMENTS` elements. Per-item work (the encoders, the graph
fusion, the first layer's query / key / value projections, the first linear layer of
every MLP over a concatenation) is computed once per image or caption and broadcast.
Where features are still per item (``fusion="intra"``) the local alignment of all pairs
is one :func:`sgfused.ops.cross_attention` call per direction (``epilogue="cosine"``);
after cross-modal fusion the features differ per pair, which the all-pairs op cannot
take, so the same math runs as batched ``matmul`` over the pairs
(:func:`paired_local_alignment`; tests check that it equals the op). ``reference=True``
routes the op calls (cross_attention and the loss) through :mod:`sgfused.reference`.

Choices where the paper is silent or ambiguous (each a documented decision):

* Label embeddings (visual graph). A label, predicate or attribute string is embedded as
  the mean of the model's own word embeddings of ``tokenize(label)`` (unknown words map
  to ``<unk>``), then a linear layer ``word_dim -> embed_size`` shared by the three kinds.
  Relation and attribute nodes are these embeddings; an object's label embedding is added
  to its region feature (object ``i`` is region ``i``; unlabelled regions are nodes
  without label). The word ids need the vocabulary, which ``build_model`` does not pass:
  call :meth:`SGFN.set_vocabulary` before encoding images (the vocabulary is not a
  weight; checkpoints already carry it).
* Text graph. Node ``p + 1`` is caption token ``p`` (position 0 is ``<start>``; every
  token, ``<start>``/``<end>`` included, is a word node as in SCAN); a relation
  ``(s, pred, o)`` is a relation node with the feature of word ``pred``, an attribute
  ``(o, a)`` an attribute node with the feature of word ``a``.
* The agent node, "connected to all nodes": an all-ones start carries nothing, so in
  one step of message passing the nodes would read only a constant from it. The
  agent is therefore fused first, from every valid node (object layer) and every
  relation / attribute node of its graph; every node then reads that fused agent as
  an object-layer neighbour, so each node sees the whole graph. Object-layer
  neighbours of a node: objects joined by a relation (either direction), the node
  itself (GAT's self loop) and the agent. Every region / word is an object-layer node; the relation / attribute layers give nodes without relations /
  attributes a zero message. One such hierarchical layer per modality, the object
  layer's weights shared by the agent's step and the nodes' step. ``alpha = 5, beta = 0``
  (the paper's start) give the relation and attribute layers a weight of
  ``1 / (1 + e^5)`` = 0.7%; they need many steps (~2,000 on the synthetic data) to
  matter.
* GAT form: per-head ``W_k`` (``d -> d``) in both Eq. 1 and Eq. 2 with attention vectors
  (GAT), LeakyReLU slope 0.2, heads averaged, ``delta`` of Eq. 2 = ELU; one ``alpha, beta``
  pair per modality; MLPs are Linear-ReLU-Linear with hidden size ``embed_size``.
* Scales (issue 20). Region features (a linear layer over 2048-d features) and bi-GRU
  word features differ by ~26x in norm (11.4 vs 0.44 at initialisation on the
  synthetic data), and unnormalised the image side drowned every fused feature and
  the scores barely depended on the caption. So, where the paper's Transformer would
  normalise: a LayerNorm on the region features, on the word features and on the
  label embeddings (the graphs' inputs; per-element scale 1, that of the all-ones
  agent), one at the output of each hierarchical fusion (nodes and agent), and in each
  cross-modal layer one on ``Y_u`` after the residual (post-norm, as a Transformer
  layer) and one on the updated agents. The GRU biases start at zero: with PyTorch's
  uniform biases the word features at initialisation hardly depended on the words
  (mean cosine 0.94 between words of different captions, 0.12 with zero biases).
  An image node is its region feature plus its label embedding (both normalised).
  No dropout. Xavier-uniform Linear weights, zero biases (SCAN / GAT).
* Contextual gates (Eq. 10): ``c'_R W^G`` gates the region rows and ``c'_T W^G`` the word
  rows (the paper's "repeat m and n times" reads swapped; its ``[G_R; G_T]`` aligned with
  ``[Q_R; Q_T]`` says this), gating is element-wise (``(G ⊙ Q)(G ⊙ K)^T``), one head,
  ``1/sqrt(d)`` scaling; padded words are masked as keys. With the normalised inputs the
  attention is not uniform at initialisation (largest weight ~3.5x ``1/(R+L)`` on the
  synthetic data; ~1x before). ``W^G`` is folded into the
  second linear layer of the Eq. 6 MLP (``W^G (W_2 h + b_2)``), exact up to rounding, since
  ``c'`` is used only through ``W^G``; the fold is computed once per ``similarity`` call.
  Eq. 7-10 have no biases, as written. The paper's "pre-trained Transformer encoder with
  12 layers" is not reproduced (no pre-training data); ``cross_layers`` sets the number of
  fusion layers, each with its own weights, and Eq. 12 updates the agents after each (the
  next layer's contexts use them).
* Eq. 12 MLPs: one per modality and layer; pooling is the mean over valid positions.
* Local alignment (Eq. 14-17) in SCAN's form, that of the fused op: the attention
  scores are ``local_smooth * cos(f_i, p_j)`` (temperature 9, SCAN's) instead of the
  learned projections ``W_r``, ``W_t`` of Eq. 14, and the attended vectors are the sums
  of the l2-normalised features. Projecting per-pair features would cost two
  ``d x d`` products per region and word of every pair, several times the rest of the
  alignment, and does not fit the op.
* ``S_L`` sums the two directions as Eq. 17 writes; word means are over valid words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data.batch import CaptionBatch, ImageBatch
from ..data.graphs import validate_caption_graph, validate_image_graph
from ..data.vocab import UNK, Vocabulary, tokenize
from ..ops import cross_attention
from ..reference import l2norm
from .base import RetrievalModel
from .encoders import GRUTextEncoder, RegionEncoder, valid_mask
from .graph_layers import GraphAttention, neighbour_mean, xavier_init
from .registry import register_model

FUSIONS = ("full", "intra", "cross")
# Elements of one per-pair feature tensor (pairs x (regions + words) x d) held per caption chunk.
PAIR_CHUNK_ELEMENTS = 1 << 23
EPS = 1e-8

ImageEncoding = tuple[Tensor, Tensor]  # regions (B, R, d), agent (B, d)
CaptionEncoding = tuple[Tensor, Tensor, Tensor]  # words (B, L, d), lengths (B,), agent (B, d)


def _mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine over the last dimension (broadcasting), with the op's ``clamp(eps)`` of the norm product."""
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return (x * y).sum(-1) / norms.clamp(min=EPS)


def _padded_index(rows: Sequence[Sequence[int]], pad: int, width: int, device: torch.device) -> Tensor:
    """``(B, width)`` int64: row ``b`` holds ``rows[b]`` then ``pad``."""
    index = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, row in enumerate(rows):
        index[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return index.to(device)


@dataclass
class SceneGraphs:
    """A batch of scene graphs over ``N`` object-layer nodes, as dense masks.

    ``adjacency (B, N, N)`` bool: object-object edges (symmetric; self loops are the
    fusion's business). ``relations (B, N, E)`` / ``attributes (B, N, A)``: 1 where a node
    meets a relation / attribute node. ``relation_valid (B, E)`` / ``attribute_valid (B, A)``:
    which relation / attribute slots are real (the rest pad the batch).
    """

    adjacency: Tensor
    relations: Tensor
    attributes: Tensor
    relation_valid: Tensor
    attribute_valid: Tensor

    @classmethod
    def build(
        cls, n_nodes: int, relation_ends: Sequence[Sequence[tuple[int, int]]], attribute_nodes: Sequence[Sequence[int]],
        dtype: torch.dtype, device: torch.device,
    ) -> "SceneGraphs":
        """From per-graph ``(subject, object)`` node pairs of the relations and the object node of each attribute."""
        batch = len(relation_ends)
        n_rel = max((len(ends) for ends in relation_ends), default=0)
        n_att = max((len(nodes) for nodes in attribute_nodes), default=0)
        rel = torch.tensor([(b, s, o, k) for b, ends in enumerate(relation_ends) for k, (s, o) in enumerate(ends)],
                           dtype=torch.long).reshape(-1, 4)
        att = torch.tensor([(b, node, k) for b, nodes in enumerate(attribute_nodes) for k, node in enumerate(nodes)],
                           dtype=torch.long).reshape(-1, 3)
        rb, rs, ro, rk = rel.unbind(1)
        ab, ao, ak = att.unbind(1)
        adjacency = torch.zeros(batch, n_nodes, n_nodes, dtype=torch.bool)
        relations = torch.zeros(batch, n_nodes, n_rel, dtype=dtype)
        attributes = torch.zeros(batch, n_nodes, n_att, dtype=dtype)
        adjacency[rb, rs, ro] = True
        adjacency[rb, ro, rs] = True
        relations[rb, rs, rk] = 1.0
        relations[rb, ro, rk] = 1.0
        attributes[ab, ao, ak] = 1.0
        rel_counts = torch.tensor([len(ends) for ends in relation_ends])
        att_counts = torch.tensor([len(nodes) for nodes in attribute_nodes])
        return cls(
            adjacency.to(device), relations.to(device), attributes.to(device),
            valid_mask(rel_counts, n_rel).to(device), valid_mask(att_counts, n_att).to(device),
        )


class HierarchicalFusion(nn.Module):
    """Intra-modal hierarchical attention fusion with a global agent node (Eq. 1-5; module doc for the graph).

    ``h'_i = LayerNorm(w_beta (h_rel + h_att) + w_alpha h_obj)`` with ``(w_alpha, w_beta) =
    softmax(alpha, beta)``. The agent, connected to all nodes, is fused first (from every
    valid node and every relation / attribute node); the nodes then read it as an
    object-layer neighbour (module doc).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.object_layer = GraphAttention(dim, heads)
        self.relation_mlp = _mlp(dim, dim, dim)
        self.attribute_mlp = _mlp(dim, dim, dim)
        xavier_init(self)
        self.norm = nn.LayerNorm(dim)
        self.layer_logits = nn.Parameter(torch.tensor([5.0, 0.0]))  # (alpha, beta), the paper's initial values

    def forward(
        self, nodes: Tensor, valid: Tensor, graphs: SceneGraphs, relation_nodes: Tensor, attribute_nodes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``nodes (B, N, d)`` with ``valid (B, N)``, relation / attribute node features ``(B, E, d)`` / ``(B, A, d)``
        -> fused nodes ``(B, N, d)`` (zero at invalid nodes) and the agent ``(B, d)``."""
        b, n, d = nodes.shape
        adjacency = torch.zeros(b, n + 1, n + 1, dtype=torch.bool, device=nodes.device)
        adjacency[:, :n, :n] = graphs.adjacency & valid[:, :, None] & valid[:, None, :]
        adjacency |= torch.eye(n + 1, dtype=torch.bool, device=nodes.device)  # self loops (padded nodes: only these)
        adjacency[:, :n, n] = valid  # every valid node reads the agent ...
        adjacency[:, n, :n] = valid  # ... and the agent reads every valid node, not its own all-ones start
        adjacency[:, n, n] = False
        relations = torch.cat([graphs.relations, graphs.relation_valid[:, None].to(nodes.dtype)], dim=1)
        attributes = torch.cat([graphs.attributes, graphs.attribute_valid[:, None].to(nodes.dtype)], dim=1)
        rel_mean, rel_has = neighbour_mean(relations, relation_nodes)
        att_mean, att_has = neighbour_mean(attributes, attribute_nodes)
        context = self.relation_mlp(rel_mean) * rel_has + self.attribute_mlp(att_mean) * att_has
        w_alpha, w_beta = torch.softmax(self.layer_logits, dim=0)
        start = torch.cat([nodes, nodes.new_ones(b, 1, d)], dim=1)  # the agent starts as all-ones
        agent = self.norm(w_beta * context[:, n] + w_alpha * self.object_layer(start, adjacency)[:, n])
        objects = self.object_layer(torch.cat([nodes, agent[:, None]], dim=1), adjacency)[:, :n]
        fused = self.norm(w_beta * context[:, :n] + w_alpha * objects) * valid[..., None]
        return fused, agent


class PairMLP(nn.Module):
    """``MLP([x || y])`` (Linear-ReLU-Linear) with the first layer split, ``W_1 [x || y] = W_x x + W_y y``.

    ``x`` and ``y`` broadcast against each other (e.g. ``(I, 1, d)`` images and ``(1, C, d)``
    captions), so the first layer runs once per item and only the sum is per pair.
    """

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.left = nn.Linear(dim, hidden)
        self.right = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, out)
        xavier_init(self)

    def hidden(self, x: Tensor, y: Tensor) -> Tensor:
        return F.relu(self.left(x) + self.right(y))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.out(self.hidden(x, y))


class ContextualCrossFusion(nn.Module):
    """One cross-modal fusion layer with contextual vectors (Eq. 6-12) for every (image, caption) pair.

    Inputs broadcast over the pair dimensions ``(I, C)``: regions ``(I, 1|C, R, d)``, words
    ``(1|I, C, L, d)`` (zero past each length) with ``word_valid (1|I, C, L)``, agents
    ``(I, 1|C, d)`` and ``(1|I, C, d)``; outputs are per pair ``(I, C, ...)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.context = PairMLP(dim, dim, 2 * dim)  # Eq. 6
        self.gate = nn.Linear(dim, dim, bias=False)  # W^G, Eq. 10
        self.query = nn.Linear(dim, dim, bias=False)  # Eq. 7-9
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.region_agent = PairMLP(dim, dim, dim)  # Eq. 12
        self.word_agent = PairMLP(dim, dim, dim)
        xavier_init(self)
        self.norm = nn.LayerNorm(dim)  # of Y_u, after the residual (a Transformer layer's post-norm)
        self.agent_norm = nn.LayerNorm(dim)  # of the updated agents, so every layer's contexts start at one scale

    def gate_weights(self) -> tuple[Tensor, Tensor]:
        """``W^G`` folded into the last layer of the Eq. 6 MLP: ``(2, d, hidden)`` weights and ``(2, d)`` biases.

        Costs ``2 d^2 hidden`` multiply-adds, so a caller computes it once per :meth:`SGFN.similarity`.
        """
        d = self.gate.weight.shape[0]
        w, b, g = self.context.out.weight, self.context.out.bias, self.gate.weight
        return torch.stack([g @ w[:d], g @ w[d:]]), torch.stack([g @ b[:d], g @ b[d:]])

    def forward(
        self, regions: Tensor, words: Tensor, word_valid: Tensor, region_agent: Tensor, word_agent: Tensor,
        gate_weights: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fused regions ``F_u (I, C, R, d)``, words ``P_u (I, C, L, d)`` and updated agents ``(I, C, d)`` x 2.

        ``gate_weights`` is :meth:`gate_weights` (``G_R = c'_R W^G``, ``G_T = c'_T W^G`` from ``[c_R || c_T]``).
        """
        n, d = regions.shape[-2], regions.shape[-1]
        hidden = self.context.hidden(region_agent, word_agent)  # (I, C, hidden)
        weight, bias = gate_weights
        gate_r, gate_t = (F.linear(hidden, weight[k], bias[k]).unsqueeze(-2) for k in range(2))  # (I, C, 1, d)
        queries = torch.cat([gate_r * self.query(regions), gate_t * self.query(words)], dim=-2)  # (I, C, R + L, d)
        keys = torch.cat([gate_r * self.key(regions), gate_t * self.key(words)], dim=-2)
        key_valid = torch.cat([word_valid.new_ones(*word_valid.shape[:-1], n), word_valid], dim=-1).unsqueeze(-2)
        logits = (queries @ keys.transpose(-1, -2)) / math.sqrt(d)
        weights = torch.softmax(logits.masked_fill(~key_valid, float("-inf")), dim=-1)  # (I, C, R + L, R + L)
        mixed = weights[..., :n] @ self.value(regions) + weights[..., n:] @ self.value(words)  # Eq. 11
        regions_u = self.norm(mixed[..., :n, :] + regions)
        words_u = self.norm(mixed[..., n:, :] + words) * word_valid.unsqueeze(-1)
        pooled_r = regions_u.mean(dim=-2)
        pooled_t = words_u.sum(dim=-2) / word_valid.sum(dim=-1, keepdim=True).to(words_u.dtype)
        return (regions_u, words_u, self.agent_norm(self.region_agent(region_agent, pooled_r)),
                self.agent_norm(self.word_agent(word_agent, pooled_t)))


def paired_local_alignment(regions: Tensor, words: Tensor, word_valid: Tensor, smooth: float) -> Tensor:
    """``S_L`` (Eq. 14-17, SCAN form, module doc) of pairs whose features broadcast to ``(I, C, ...)``.

    ``regions (I|1, C|1, R, d)``, ``words (I|1, C|1, L, d)`` with ``word_valid`` broadcastable to
    ``(I, C, L)``; returns ``(I, C)``. The same math as :func:`sgfused.ops.cross_attention`
    (``norm="none"``, ``epilogue="cosine"``) on l2-normalised features, taken pair by pair.
    """
    r, w = l2norm(regions, EPS), l2norm(words, EPS)
    valid = word_valid.unsqueeze(-2)  # (.., 1, L)
    scores = smooth * (r @ w.transpose(-1, -2))  # (I, C, R, L)
    to_words = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1) @ w  # region -> word, Eq. 15
    to_regions = torch.softmax(scores.transpose(-1, -2), dim=-1) @ r  # word -> region, Eq. 16
    region_term = _cosine(to_words, r).mean(dim=-1)
    word_cos = _cosine(to_regions, w).masked_fill(~word_valid, 0.0)
    return region_term + word_cos.sum(dim=-1) / word_valid.sum(dim=-1).to(word_cos.dtype)


@register_model("sgfn")
class SGFN(RetrievalModel):
    """Scene Graph based Fusion Network: hierarchical graph fusion, contextual cross fusion, global + local score.

    Options: ``embed_size`` d, ``word_dim``, ``img_dim``, GRU ``num_layers`` / ``bi_gru``;
    ``heads`` of the object-layer graph attention (8); ``fusion`` ``"full" | "intra" |
    "cross"`` (the paper's ablations); ``cross_layers`` (cross-modal fusion layers, 1; not
    used by ``"intra"``); ``delta`` (0.3) the weight of the local score; ``local_smooth`` (9)
    the local-alignment softmax temperature; ``reference=True`` runs the ops on
    :mod:`sgfused.reference`. Call :meth:`set_vocabulary` before encoding images with graphs.
    """

    data_requirements = ("image_graphs", "caption_graphs")
    _version = 2  # 2: LayerNorms, the agent feeds the nodes (module doc); version-1 weights are refused
    oldest_state_version = 2
    incompatible_change = "LayerNorms were added and the agent node feeds the nodes since version 2"

    def __init__(
        self,
        vocab_size: int,
        *,
        img_dim: int = 2048,
        embed_size: int = 1024,
        word_dim: int = 300,
        num_layers: int = 1,
        bi_gru: bool = True,
        heads: int = 8,
        fusion: str = "full",
        cross_layers: int = 1,
        delta: float = 0.3,
        local_smooth: float = 9.0,
        margin: float = 0.2,
        max_violation: bool = True,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if cross_layers < 1:
            raise ValueError(f"cross_layers must be >= 1, got {cross_layers}")
        self.embed_size, self.fusion = embed_size, fusion
        self.delta, self.local_smooth = float(delta), float(local_smooth)
        self.margin, self.max_violation, self.reference = float(margin), bool(max_violation), bool(reference)
        self.image_encoder = RegionEncoder(img_dim, embed_size, normalize=False)
        self.text_encoder = GRUTextEncoder(vocab_size, word_dim, embed_size, num_layers, bi_gru, normalize=False)
        for name, weight in self.text_encoder.rnn.named_parameters():
            if name.startswith("bias"):
                nn.init.zeros_(weight)  # word features driven by the words from the start (module doc)
        self.region_norm = nn.LayerNorm(embed_size)  # encoder outputs at one scale (module doc)
        self.word_norm = nn.LayerNorm(embed_size)
        self.graph_fusion = fusion != "cross"
        if self.graph_fusion:
            self.label_proj = nn.Linear(word_dim, embed_size)
            xavier_init(self.label_proj)
            self.label_norm = nn.LayerNorm(embed_size)
            self.visual_fusion = HierarchicalFusion(embed_size, heads)
            self.text_fusion = HierarchicalFusion(embed_size, heads)
        self.cross = nn.ModuleList(ContextualCrossFusion(embed_size) for _ in range(cross_layers if fusion != "intra" else 0))
        self.vocabulary: Vocabulary | None = None
        self._label_ids: dict[str, list[int]] = {}


    def set_vocabulary(self, vocab: Vocabulary) -> None:
        """The vocabulary whose word embeddings embed the visual graphs' label words (module doc).

        Must be the vocabulary the captions are encoded with (same size as the embedding).
        """
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"vocab must be a sgfused.data.vocab.Vocabulary, got {type(vocab).__name__}")
        size = self.text_encoder.embed.num_embeddings
        if len(vocab) != size:
            raise ValueError(f"vocab has {len(vocab)} words but the model's word embedding has {size} (vocab_size)")
        self.vocabulary, self._label_ids = vocab, {}

    # ------------------------------------------------------------------ encoders
    def encode_image(self, features: Tensor, graphs: Sequence[dict] | None) -> ImageEncoding:
        """Region features ``(B, R, img_dim)`` and one visual graph per image -> ``(F' (B, R, d), c_R (B, d))``.

        ``graphs`` may be None only with ``fusion="cross"`` (no graph fusion).
        """
        if features.dim() != 3:
            raise ValueError(f"features must be (B, R, img_dim), got shape {tuple(features.shape)}")
        regions = self.region_norm(self.image_encoder(features))
        batch, n_regions, _ = regions.shape
        if not self.graph_fusion:
            return regions, regions.new_ones(batch, self.embed_size)
        graphs = self._check_graphs(graphs, batch, "image")
        for b, graph in enumerate(graphs):
            validate_image_graph(graph, n_regions, f"image graphs[{b}]")
        names: dict[str, int] = {}

        def indices(values: list) -> list[int]:
            return [names.setdefault(self._label_name(v), len(names)) for v in values]

        objects = [indices(g["labels"]) for g in graphs]
        relations = [indices([r[1] for r in g["rels"]]) for g in graphs]
        attributes = [indices([a[1] for a in g["attrs"]]) for g in graphs]
        table = torch.cat([self._embed_labels(list(names), regions.device), regions.new_zeros(1, self.embed_size)])
        pad = len(names)  # the zero row: no label
        device = regions.device
        nodes = regions + table[_padded_index(objects, pad, n_regions, device)]
        rel_nodes = table[_padded_index(relations, pad, max(map(len, relations), default=0), device)]
        att_nodes = table[_padded_index(attributes, pad, max(map(len, attributes), default=0), device)]
        scene = SceneGraphs.build(
            n_regions, [[(r[0], r[2]) for r in g["rels"]] for g in graphs], [[a[0] for a in g["attrs"]] for g in graphs],
            regions.dtype, device,
        )
        valid = torch.ones(batch, n_regions, dtype=torch.bool, device=device)
        return self.visual_fusion(nodes, valid, scene, rel_nodes, att_nodes)

    def encode_text(self, ids: Tensor, lengths: Tensor, graphs: Sequence[dict] | None) -> CaptionEncoding:
        """Token ids ``(B, L)``, lengths ``(B,)`` and one caption graph per caption -> ``(P', lengths, c_T)``.

        ``P' (B, L, d)`` is zero past each length. ``graphs`` may be None only with ``fusion="cross"``.
        """
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"ids must be (B, L) and lengths (B,), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
        if ids.is_floating_point() or lengths.is_floating_point():
            raise TypeError(f"ids and lengths must be integer tensors, got {ids.dtype} and {lengths.dtype}")
        if ids.numel() == 0:
            raise ValueError(f"need at least one caption of at least one token, got ids of shape {tuple(ids.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]:
            raise ValueError(f"lengths must lie in [1, {ids.shape[1]}] (the padded length), got "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        vocab_size = self.text_encoder.embed.num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"ids must lie in [0, {vocab_size}) (vocab_size), got [{int(ids.min())}, {int(ids.max())}]")
        lengths = lengths.to(ids.device)
        valid = valid_mask(lengths, ids.shape[1])
        words = self.word_norm(self.text_encoder(ids, lengths)) * valid[..., None]
        batch = words.shape[0]
        if not self.graph_fusion:
            return words, lengths, words.new_ones(batch, self.embed_size)
        graphs = self._check_graphs(graphs, batch, "caption")
        host_lengths = lengths.tolist()
        for b, graph in enumerate(graphs):
            validate_caption_graph(graph, max(host_lengths[b] - 2, 0), f"caption graphs[{b}]")
        # token position p is word node p + 1 (after <start>)
        relation_words = [[r[1] + 1 for r in g["relations"]] for g in graphs]
        attribute_words = [[a[1] + 1 for a in g["attributes"]] for g in graphs]
        scene = SceneGraphs.build(
            words.shape[1], [[(r[0] + 1, r[2] + 1) for r in g["relations"]] for g in graphs],
            [[a[0] + 1 for a in g["attributes"]] for g in graphs], words.dtype, words.device,
        )
        fused, agent = self.text_fusion(
            words, valid, scene,
            self._gather(words, relation_words, scene.relation_valid), self._gather(words, attribute_words, scene.attribute_valid),
        )
        return fused, lengths, agent

    def encode_images(self, images: ImageBatch) -> ImageEncoding:
        return self.encode_image(images.features, images.graphs)

    def encode_captions(self, captions: CaptionBatch) -> CaptionEncoding:
        return self.encode_text(captions.ids, captions.lengths, captions.graphs)

    # ------------------------------------------------------------------ similarity
    def similarity(self, images: ImageEncoding, captions: CaptionEncoding) -> Tensor:
        """Scores ``S = S_G + delta * S_L`` ``(n_image, n_caption)`` of every pair of the given encodings."""
        regions, region_agent = self._check_image_encoding(images)
        words, lengths, word_agent = self._check_caption_encoding(captions)
        if not len(self.cross):  # features are per item: every pair at once, local alignment through the op
            glob = l2norm(region_agent, EPS) @ l2norm(word_agent, EPS).t()
            return glob + self.delta * self._local_alignment_all_pairs(regions, words, lengths)
        per_caption = regions.shape[0] * (regions.shape[1] + words.shape[1]) * self.embed_size
        step = max(1, PAIR_CHUNK_ELEMENTS // per_caption)
        gate_weights = [layer.gate_weights() for layer in self.cross]
        columns = [self._fused_scores(regions, region_agent, words[s : s + step], lengths[s : s + step],
                                      word_agent[s : s + step], gate_weights) for s in range(0, words.shape[0], step)]
        return torch.cat(columns, dim=1)

    def _fused_scores(self, regions: Tensor, region_agent: Tensor, words: Tensor, lengths: Tensor,
                      word_agent: Tensor, gate_weights: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Scores of all images against one chunk of captions through the cross-modal layers."""
        longest = int(lengths.max())
        word_valid = valid_mask(lengths, longest)[None]  # (1, C, L)
        r, w, ra, wa = regions[:, None], words[None, :, :longest], region_agent[:, None], word_agent[None]
        for layer, weights in zip(self.cross, gate_weights):
            r, w, ra, wa = layer(r, w, word_valid, ra, wa, weights)
        glob = (l2norm(ra, EPS) * l2norm(wa, EPS)).sum(dim=-1)
        return glob + self.delta * paired_local_alignment(r, w, word_valid, self.local_smooth)

    def _local_alignment_all_pairs(self, regions: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """``S_L (I, C)`` of per-item features: :func:`sgfused.ops.cross_attention` in both directions."""
        r, w = l2norm(regions, EPS), l2norm(words, EPS)
        options = dict(smooth=self.local_smooth, norm="none", epilogue="cosine", backend=self.backend)
        to_words = cross_attention(r, w, context_lens=lengths, **options)  # (I, C, R)
        to_regions = cross_attention(w, r, query_lens=lengths, **options)  # (C, I, L), 0 past each length
        return to_words.mean(dim=-1) + (to_regions.sum(dim=-1) / lengths[:, None].to(to_regions.dtype)).t()


    # ------------------------------------------------------------------ helpers
    def _label_name(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"SGFN embeds the words of visual-graph labels, predicates and attributes; got the "
                             f"non-string label {value!r} (map class ids to their names first)")
        return value

    def _embed_labels(self, names: list[str], device: torch.device) -> Tensor:
        """``(len(names), d)``: the projected mean word embedding of each label (module doc)."""
        if self.vocabulary is None:
            raise RuntimeError("SGFN needs the vocabulary to embed visual-graph labels: call "
                               "model.set_vocabulary(vocab) (with the captions' Vocabulary) before encoding images")
        ids, offsets = [], []
        for name in names:
            if name not in self._label_ids:
                self._label_ids[name] = [self.vocabulary(word) for word in tokenize(name)] or [self.vocabulary(UNK)]
            offsets.append(len(ids))
            ids.extend(self._label_ids[name])
        embed = self.text_encoder.embed.weight
        mean = F.embedding_bag(torch.tensor(ids, dtype=torch.long, device=device),
                               embed, torch.tensor(offsets, dtype=torch.long, device=device), mode="mean")
        return self.label_norm(self.label_proj(mean))

    @staticmethod
    def _gather(words: Tensor, positions: list[list[int]], valid: Tensor) -> Tensor:
        """``(B, K, d)``: ``words[b, positions[b][k]]``, zero in padded slots."""
        index = _padded_index(positions, 0, valid.shape[1], words.device)
        gathered = words.gather(1, index.unsqueeze(-1).expand(-1, -1, words.shape[-1]))
        return gathered * valid.unsqueeze(-1).to(words.dtype)

    @staticmethod
    def _check_graphs(graphs: Sequence[dict] | None, batch: int, kind: str) -> Sequence[dict]:
        if graphs is None:
            raise ValueError(f"SGFN (fusion 'full' or 'intra') needs {kind} scene graphs: load the split with "
                             f"{kind}_graphs=True (data_requirements) or pass one graph per {kind}")
        if len(graphs) != batch:
            raise ValueError(f"expected one {kind} graph per {kind} ({batch}), got {len(graphs)}")
        return graphs

    def _check_image_encoding(self, images: Any) -> ImageEncoding:
        if not isinstance(images, tuple) or len(images) != 2:
            raise TypeError("images must be the (regions, agent) encoding of encode_images / encode_image")
        regions, agent = images
        d = self.embed_size
        if regions.dim() != 3 or regions.shape[2] != d or agent.shape != (regions.shape[0], d) or not regions.shape[0]:
            raise ValueError(f"image encoding must be regions (I >= 1, R, {d}) and agent (I, {d}), got "
                             f"{tuple(regions.shape)} and {tuple(agent.shape)}")
        return regions, agent

    def _check_caption_encoding(self, captions: Any) -> CaptionEncoding:
        if not isinstance(captions, tuple) or len(captions) != 3:
            raise TypeError("captions must be the (words, lengths, agent) encoding of encode_captions / encode_text")
        words, lengths, agent = captions
        d = self.embed_size
        if (words.dim() != 3 or words.shape[2] != d or lengths.shape != words.shape[:1]
                or agent.shape != (words.shape[0], d) or not words.shape[0]):
            raise ValueError(f"caption encoding must be words (C >= 1, L, {d}), lengths (C,) and agent (C, {d}), got "
                             f"{tuple(words.shape)}, {tuple(lengths.shape)} and {tuple(agent.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > words.shape[1]:
            raise ValueError(f"lengths must lie in [1, {words.shape[1]}], got [{int(lengths.min())}, {int(lengths.max())}]")
        return words, lengths, agent
