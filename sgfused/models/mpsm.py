"""MPSM (Xie, Hou & Li, UAI 2023): multi-perspective similarity modelling for image-text retrieval.

What. Regions and words each form a *semantic knowledge graph* (Eq. 1-4):
``E = column_l2norm(softmax_{j != i}(lambda x_i . x_j) * P)`` with ``P`` a spatial
dependence matrix from the region boxes (images) or the dependency parse
(captions). ``kgid_layers`` KGID layers (Eq. 5-9) propagate over it, gate,
update the nodes, and re-learn the edges from the new nodes' affinity; SGRAF's
self-attention pooling gives the global vectors. Every (image, caption) pair then
gets a global similarity vector and one local vector per word (SCAN text-to-image
attention), in the ``perspective`` "distance" (``(x - y)^2``, Eq. 10-12) or
"direction" (element-wise cosine terms, Eq. 13-15), through
:func:`sgfused.ops.cross_attention` and :func:`sgfused.ops.pairwise_similarity`.
SRGR (Eq. 16-20) reconstructs the similarity-relation graph of these nodes and a
linear layer scores the result. The published MPSM* is the average of a
"distance" and a "direction" model trained separately
(``sgfused.evaluate.ensemble``).

Why batched this way. KGID and the pooling depend on one modality only, so they
run in :meth:`MPSM.encode_image` / :meth:`MPSM.encode_text` (evaluation encodes
each image and caption once); :meth:`MPSM.similarity` scores all pairs through
the fused ops in SGRAF's length-sorted caption chunks, with activation
checkpointing of SRGR, as :class:`sgfused.models.sgraf.SGRAF` does.
``reference=True`` runs the same math on the reference ops.

Choices where the paper is silent or inconsistent (shapes decide; otherwise
SGRAF's published code, which MPSM builds on):

* Spatial dependence ``P_v`` (Eq. 2 prints ``P_t``, read ``P_v``). Following
  Norcliffe-Brown et al. (2018), the offset between two box centres (normalised
  image coordinates, y pointing down) is taken in polar coordinates: distance
  ``rho`` and angle ``theta``. ``spatial_kernels`` learnable kernels
  ``exp(-(rho - mu_k)^2 / (2 sigma_k^2)) * exp(kappa_k (cos(theta - nu_k) - 1))``
  (Gaussian in distance, von Mises in angle, so the angle wraps smoothly) are mixed
  with softmax weights into one weight in (0, 1] per pair: Hadamard with ``r^v``
  needs one number per pair, and a learnt mixture lets the model decide which
  distances and directions relate regions instead of fixing that by hand. At
  initialisation the kernels sit at distance 0 (sigma 0.5) with directions spread
  evenly and equal weights, so ``P_v`` starts as a near-isotropic falloff with
  distance. Boxes with coincident centres have no direction (their angle term is
  taken at 90 degrees from every kernel); the diagonal is 1 (self loops, as in the
  textual graph).
* Dependency matrix ``P_t``: 1 on each arc of ``CaptionBatch.graphs[b]["heads"]``,
  both directions (the graph is undirected), and on the diagonal of the valid
  words. Word node ``k`` is token id position ``k`` of the caption, so token ``p``
  of the parse is node ``p + 1``; the ``<start>`` and ``<end>`` nodes (which the
  bi-GRU, as in SGRAF, encodes like words) get self loops only.
* Semantic correlation (Eq. 1, 3): the softmax of row ``i`` runs over the other nodes
  ``j != i`` (a node's correlation with the *other* regions / words). With ``j = i``
  included, a unit vector's product with itself (1) dominates every row at
  ``lambda = 9``: about 99.8% of each row sat on the diagonal at initialisation, so
  ``E`` was nearly the identity whatever ``P`` said, and replacing ``P_v`` by all ones
  moved scores by < 1e-7 (spread ~1e-2). A node with no other valid node keeps its
  self loop. The diagonal of ``P`` (self loops) then only matters for such nodes.
* KGID (Eq. 5): ``V_k = N * softmax(A V W) * V``, the softmax over the ``N`` valid
  nodes for each feature (each region's "knowledge weight coefficient" relative to the
  others), scaled by ``N`` so that the coefficients average 1 and a uniform softmax
  gives ``V_k = V`` (a scaling the paper implies: coefficients that multiply the node
  features). The logits are multiplied by ``kgid_logit_scale``, by default the
  paper's ``lambda`` (9, the scale factor of its other softmaxes, Eq. 1, 3, 9):
  as printed (``kgid_logit_scale=1``) the softmax sees the small logits of
  l2-normalised nodes through a Xavier ``W`` and stays close to uniform, and the
  graphs moved scores ~10x less at initialisation; trained to a plateau on the
  hard synthetic scenes the scaled model is ahead (README, "MPSM: Eq. 5's logits
  x lambda"; ``bench/compare_synthetic.py``'s ``mpsm_*_printed`` variants). The
  default changed in state-dict version 3; checkpoints of version 2 that left the
  option out are rebuilt with 1, as they were trained (``former_defaults``).
  Without ``N``, ``V_k ~ V / N`` (``|V_k| / |V|`` was 0.028 at initialisation):
  the graph term all but vanished and shrank with caption length. ``V`` in Eq. 5-8
  is the current layer's input; Eq. 9's edge update is computed for every layer but
  the last (whose edges would never be read). ``W`` of Eq. 5 and ``W_O``, ``W_I`` of
  Eq. 9 have no bias, ``W_kg`` has ``b`` (as printed). The KGID output is
  l2-normalised, as the encoder outputs SGRAF feeds to the same attention and
  similarity functions are. Weights of the earlier reading (state-dict version 1)
  are refused on loading (:mod:`sgfused.models.state_versions`).
* Graph ablations: ``spatial_prior=False`` replaces ``P_v`` by all ones (semantic
  correlation only), ``dependency_prior=False`` removes every dependency arc; both
  can be set on a trained model to measure what its graphs contribute.
* Global features: SGRAF's self-attention pooling (``VisualSA`` / ``TextSA``),
  whose l2-normalised output makes the paper's ``1/N`` factor irrelevant.
* Local attention: the printed cosine + softmax is SCAN's attention as SGRAF runs
  it (leaky ReLU 0.1, clipped l2 normalisation, temperature ``lambda_softmax``);
  features are l2-normalised, so the dot product is the cosine.
* ``W_d`` / ``W_c`` (Eq. 10, 13) are ``nn.Linear`` with bias (SGRAF's
  ``sim_tranloc_w`` / ``sim_tranglo_w``); "direction" maps the element-wise
  products of the normalised vectors (whose sum is the cosine) to ``sim_dim``.
* SRGR edges (Eq. 16): ``W_out``, ``W_in`` map a node to one score each (the
  printed ``m x 1`` / ``1 x m``), and "⊕" of the two batch-normalised scalar scores
  is read as their sum (the scalar "trend score"), so
  ``E(a -> b) = sigmoid(BN(o_a) + BN(i_b)) / sum_b' sigmoid(BN(o_a) + BN(i_b'))``
  and the incoming weights swap the roles, ``sigmoid(BN(i_a) + BN(o_b))``. Eq. 17
  propagates the nodes themselves (its "m x m" remark has no matrix to apply to).
  Each BatchNorm uses, in training, the statistics of one caption's valid nodes over
  all images, as SGRAF's per-caption SAF does
  (:mod:`sgfused.models.similarity_common`); padded word nodes never enter them.
* SRGR read-out: one reconstruction step; the score is
  ``sigmoid(Linear(m, 1)(s*_g))`` of the global node, as SGRAF's SGR reads the
  global node and squashes with a sigmoid. Only that node's reconstruction is
  computed (the others are never read). ``W_1*``, ``W_2*`` have no bias (as printed),
  the gate and ``W*`` have one.
* Word-embedding and self-attention dropout 0.4, Xavier initialisation and the
  bi-GRU encoder follow SGRAF's code. Training recipes (``configs/mpsm_*.json``):
  the paper's epochs (30 Flickr30K, 20 COCO), margin 0.2, lambda 9, sim dim 256,
  Adam; learning rate 2e-4, batch 128 and clipping 2.0 are SGRAF's; the decay
  (x0.1) halfway through is SGRAF's COCO schedule (its Flickr30K step at epoch 30
  would never fire in a 30-epoch run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batch import CaptionBatch, ImageBatch
from ..ops import cross_attention, pairwise_similarity
from ..reference import l2norm
from .base import RetrievalModel
from .caption_chunks import caption_chunks, check_lengths, check_token_ids, default_chunk_nodes
from .encoders import GRUTextEncoder, RegionEncoder, valid_mask
from .graph_layers import xavier_init
from .registry import register_model
from .sgraf import DROPOUT, SelfAttentionPool, _EmbeddingWithDropout
from .similarity_common import caption_batch_norm, update_running_stats

PERSPECTIVES = ("distance", "direction")
ImageEncoding = tuple[Tensor, Tensor]  # regions (I, R, d), global (I, d)
CaptionEncoding = tuple[Tensor, Tensor, Tensor]  # words (C, L, d), lengths (C,), global (C, d)


# ---------------------------------------------------------------------------- knowledge graphs (Eq. 1-4)
class PolarSpatialGraph(nn.Module):
    """Spatial dependence ``P_v (B, R, R)`` of regions from their boxes: learnt polar kernels (module doc)."""

    def __init__(self, kernels: int = 8) -> None:
        super().__init__()
        if kernels < 1:
            raise ValueError(f"spatial_kernels must be >= 1, got {kernels}")
        self.distance_mean = nn.Parameter(torch.zeros(kernels))
        self.distance_log_std = nn.Parameter(torch.full((kernels,), math.log(0.5)))
        self.angle_mean = nn.Parameter(torch.arange(kernels) * (2 * math.pi / kernels))
        self.angle_log_concentration = nn.Parameter(torch.zeros(kernels))
        self.mixture = nn.Parameter(torch.zeros(kernels))

    @staticmethod
    def polar(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Centre offsets ``j - i`` of every region pair: distance ``(B, R, R)`` and unit direction (cos, sin)."""
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        offset = centres.unsqueeze(1) - centres.unsqueeze(2)  # [b, i, j] = c_j - c_i
        distance = torch.linalg.vector_norm(offset, dim=-1)
        unit = offset / distance.clamp(min=1e-12).unsqueeze(-1)  # zero where the centres coincide
        return distance, unit[..., 0], unit[..., 1]

    def forward(self, boxes: Tensor) -> Tensor:
        distance, cos, sin = self.polar(boxes)
        d, c, s = distance.unsqueeze(-1), cos.unsqueeze(-1), sin.unsqueeze(-1)  # (B, R, R, 1)
        radial = torch.exp(-((d - self.distance_mean) ** 2) / (2 * torch.exp(2 * self.distance_log_std)))
        cos_delta = c * torch.cos(self.angle_mean) + s * torch.sin(self.angle_mean)  # cos(theta - nu_k)
        angular = torch.exp(torch.exp(self.angle_log_concentration) * (cos_delta - 1))
        weights = (radial * angular) @ torch.softmax(self.mixture, dim=0)  # (B, R, R)
        eye = torch.eye(boxes.shape[1], dtype=torch.bool, device=boxes.device)
        return weights.masked_fill(eye, 1.0)


def dependency_matrix(graphs: Sequence[dict], lengths: Tensor, padded: int) -> Tensor:
    """``P_t (B, padded, padded)``: 1 on dependency arcs (both directions) and the valid diagonal, 0 elsewhere.

    ``graphs[b]["heads"]`` holds the head of each token of caption ``b`` (-1: root);
    token ``p`` is word node ``p + 1`` (after ``<start>``), so a caption of ``n``
    tokens has ``lengths[b] == n + 2``.
    """
    host_lengths = lengths.tolist()
    if len(graphs) != len(host_lengths):
        raise ValueError(f"expected one caption graph per caption ({len(host_lengths)}), got {len(graphs)}")
    batch, rows, cols = [], [], []
    for b, (graph, length) in enumerate(zip(graphs, host_lengths)):
        heads = graph.get("heads") if isinstance(graph, dict) else None
        if not isinstance(heads, (list, tuple)) or len(heads) != length - 2:
            got = f"{len(heads)} heads" if isinstance(heads, (list, tuple)) else f"{type(graph).__name__} {graph!r:.60}"
            raise ValueError(f"caption graph {b}: expected a dict whose 'heads' has one entry per token "
                             f"(length {length} - 2 for <start>/<end> = {length - 2}), got {got}")
        for token, head in enumerate(heads):
            if not isinstance(head, int) or not -1 <= head < len(heads) or head == token:
                raise ValueError(f"caption graph {b}: head {head!r} of token {token} is not -1 or another token "
                                 f"position in [0, {len(heads)})")
            if head >= 0:
                batch += [b, b]
                rows += [token + 1, head + 1]
                cols += [head + 1, token + 1]
    matrix = torch.zeros(len(host_lengths), padded, padded)
    matrix[batch, rows, cols] = 1.0
    diagonal = valid_mask(lengths.cpu(), padded).float()
    return (matrix + torch.diag_embed(diagonal)).to(lengths.device)


def knowledge_edges(nodes: Tensor, prior: Tensor, valid: Tensor | None, smooth: float) -> Tensor:
    """``E = column_l2norm(softmax_{j != i}(smooth * x_i . x_j) * P)`` (Eq. 1-4), padded nodes excluded as ``j``.

    The node itself is left out of its row's softmax (module doc); a node with no other
    valid node keeps its self loop (its only entry then).
    """
    logits = smooth * nodes @ nodes.transpose(1, 2)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    eye = torch.eye(nodes.shape[1], dtype=torch.bool, device=nodes.device)
    logits = logits.masked_fill(eye, torch.finfo(logits.dtype).min)  # below every other node, above padding
    edges = torch.softmax(logits, dim=-1) * prior
    return edges / (torch.linalg.vector_norm(edges, dim=1, keepdim=True) + 1e-8)


# ---------------------------------------------------------------------------- KGID (Eq. 5-9)
class KGIDLayer(nn.Module):
    """One knowledge-dissemination layer: propagate (Eq. 5), gate (6-7), residual update (8).

    Eq. 5 as read here (module doc): ``V_k = N * softmax_nodes(A V W) * V`` with ``N`` the
    number of valid nodes, so a uniform softmax leaves ``V_k = V``.
    """

    def __init__(self, dim: int, logit_scale: float) -> None:
        super().__init__()
        self.logit_scale = logit_scale
        self.propagate = nn.Linear(dim, dim, bias=False)  # W^(l)
        self.aggregate = nn.Linear(dim, dim)  # W_kg^(l), b^(l)
        xavier_init(self)

    def forward(self, nodes: Tensor, edges: Tensor, valid: Tensor | None) -> Tensor:
        logits = self.propagate(edges @ nodes)  # (B, N, d)
        if self.logit_scale != 1.0:
            logits = self.logit_scale * logits
        if valid is None:
            count = nodes.new_full((1, 1, 1), nodes.shape[1])
        else:
            logits = logits.masked_fill(~valid.unsqueeze(-1), float("-inf"))
            count = valid.sum(dim=-1).to(nodes.dtype)[:, None, None]
        # V_k, Eq. 5: per feature, knowledge weight coefficients over the nodes, 1 on average
        knowledge = count * torch.softmax(logits, dim=-2) * nodes
        gate = torch.sigmoid(knowledge * nodes + nodes)  # Eq. 6
        gated = gate * knowledge + (1 - gate) * nodes  # Eq. 7
        return F.relu(self.aggregate(gated) + nodes)  # Eq. 8


class EdgeUpdate(nn.Module):
    """Eq. 9: ``A = softmax_j(smooth * (W_O v_i) . (W_I v_j))`` over the valid nodes ``j``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.outgoing = nn.Linear(dim, dim, bias=False)  # W_O
        self.incoming = nn.Linear(dim, dim, bias=False)  # W_I
        xavier_init(self)

    def forward(self, nodes: Tensor, valid: Tensor | None, smooth: float) -> Tensor:
        logits = smooth * self.outgoing(nodes) @ self.incoming(nodes).transpose(1, 2)
        if valid is not None:
            logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, dim=-1)


class KnowledgeGraphDissemination(nn.Module):
    """``layers`` KGID layers on ``(B, N, d)`` nodes with first edges ``E`` -> l2-normalised ``(B, N, d)``.

    Padded nodes (``valid`` False) are zero on output and never reach a valid node.
    """

    def __init__(self, dim: int, layers: int, smooth: float, logit_scale: float) -> None:
        super().__init__()
        self.smooth = smooth
        self.layers = nn.ModuleList(KGIDLayer(dim, logit_scale) for _ in range(layers))
        self.edge_updates = nn.ModuleList(EdgeUpdate(dim) for _ in range(max(layers - 1, 0)))

    def forward(self, nodes: Tensor, edges: Tensor, valid: Tensor | None) -> Tensor:
        for depth, layer in enumerate(self.layers):
            nodes = layer(nodes, edges, valid)
            if valid is not None:
                nodes = nodes.masked_fill(~valid.unsqueeze(-1), 0)
            if depth < len(self.edge_updates):
                edges = self.edge_updates[depth](nodes, valid, self.smooth)
        return l2norm(nodes)


# ---------------------------------------------------------------------------- SRGR (Eq. 16-20)
class SimilarityRelationReconstruction(nn.Module):
    """SRGR on the similarity nodes of every pair, read out at the global node as a score in (0, 1)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.out_score = nn.Linear(sim_dim, 1)  # W_out
        self.in_score = nn.Linear(sim_dim, 1)  # W_in
        self.out_bn = nn.BatchNorm1d(1)
        self.in_bn = nn.BatchNorm1d(1)
        self.gate = nn.Linear(2 * sim_dim, sim_dim)  # W~, b~ (Eq. 18)
        self.rebuild_out = nn.Linear(sim_dim, sim_dim, bias=False)  # W_1* (Eq. 19)
        self.rebuild_in = nn.Linear(sim_dim, sim_dim, bias=False)  # W_2*
        self.fuse = nn.Linear(sim_dim, sim_dim)  # W*, b* (Eq. 20)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        xavier_init(self)

    def forward(self, glob: Tensor, local: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """``glob (C, I, m)``, ``local (C, I, L, m)`` -> scores ``(C, I)``; in training, per-caption BN statistics."""
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)  # (C, I, N = L + 1, m)
        valid = (torch.arange(nodes.shape[2], device=lengths.device) <= lengths[:, None]).unsqueeze(1)  # (C, 1, N)
        outgoing, out_stats = caption_batch_norm(self.out_score(nodes).squeeze(-1), valid, self.out_bn, self.training)
        incoming, in_stats = caption_batch_norm(self.in_score(nodes).squeeze(-1), valid, self.in_bn, self.training)
        propagated = []
        for source, target in ((outgoing, incoming), (incoming, outgoing)):  # Eq. 16-17, outgoing then incoming
            weights = torch.sigmoid(source[..., :1] + target).masked_fill(~valid, 0)  # edges of the global node
            weights = weights / weights.sum(dim=-1, keepdim=True)
            propagated.append((weights.unsqueeze(-2) @ nodes).squeeze(-2))  # (C, I, m)
        forward_, backward_ = propagated
        gate = torch.sigmoid(self.gate(torch.cat([forward_, backward_], dim=-1)))  # Eq. 18
        rebuilt = self.rebuild_out(gate * forward_) + forward_ + self.rebuild_in(gate * backward_) + backward_  # Eq. 19
        vector = self.fuse(rebuilt)  # Eq. 20
        scores = torch.sigmoid(self.sim_eval_w(vector)).squeeze(-1)
        stats = None if out_stats is None else (*out_stats, *in_stats)
        return scores, stats


# ---------------------------------------------------------------------------- the model
@register_model("mpsm")
class MPSM(RetrievalModel):
    """Multi-Perspective Similarity Modelling, one perspective ("distance" or "direction") per model.

    Image encodings are ``(regions (I, num_regions, d), global (I, d))`` after
    visual KGID; caption encodings ``(words (C, L, d), lengths (C,), global (C, d))``
    after textual KGID (zero past each length). ``lambda_softmax`` (the paper's
    lambda, 9) is the temperature of the knowledge-graph softmaxes and of the
    cross-attention; ``spatial_kernels`` the polar kernels of the visual graph;
    ``spatial_prior=False`` / ``dependency_prior=False`` are the graph ablations (``P_v``
    all ones; ``P_t`` without arcs, self loops only); ``kgid_logit_scale`` multiplies
    Eq. 5's logits (default: the paper's lambda, 9; 1 is the equation as printed, module
    doc); ``reference=True`` computes similarities and the loss with the reference ops.
    """

    data_requirements = ("boxes", "caption_graphs")
    image_batch_statistics = True  # the image self-attention's BatchNorms (sgfused.distributed)
    # 3: kgid_logit_scale defaults to lambda; 2: Eq. 1's softmax leaves the node itself out, Eq. 5 is scaled by N
    # (module doc); 1 read neither and is refused
    _version = 3
    former_defaults = {"kgid_logit_scale": (3, 1.0)}
    oldest_state_version = 2
    incompatible_change = "its knowledge graphs are read differently since version 2"

    def __init__(
        self,
        vocab_size: int,
        *,
        perspective: str = "distance",
        embed_size: int = 1024,
        word_dim: int = 300,
        sim_dim: int = 256,
        kgid_layers: int = 3,
        lambda_softmax: float = 9.0,
        margin: float = 0.2,
        max_violation: bool = True,
        img_dim: int = 2048,
        num_layers: int = 1,
        bi_gru: bool = True,
        no_imgnorm: bool = False,
        no_txtnorm: bool = False,
        num_regions: int = 36,
        spatial_kernels: int = 8,
        spatial_prior: bool = True,
        dependency_prior: bool = True,
        kgid_logit_scale: float = 9.0,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if perspective not in PERSPECTIVES:
            raise ValueError(f"perspective must be one of {PERSPECTIVES}, got {perspective!r}")
        if kgid_layers < 0:
            raise ValueError(f"kgid_layers must be >= 0, got {kgid_layers}")
        scale = kgid_logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"kgid_logit_scale must be a finite number > 0, got {kgid_logit_scale!r}")
        self.perspective, self.embed_size, self.num_regions = perspective, embed_size, num_regions
        self.lambda_softmax = float(lambda_softmax)
        self.spatial_prior, self.dependency_prior = bool(spatial_prior), bool(dependency_prior)
        self.margin, self.max_violation, self.reference = float(margin), bool(max_violation), bool(reference)
        self.image_encoder = RegionEncoder(img_dim, embed_size, normalize=not no_imgnorm)
        self.text_encoder = GRUTextEncoder(vocab_size, word_dim, embed_size, num_layers, bi_gru, normalize=not no_txtnorm)
        self.text_encoder.embed = _EmbeddingWithDropout(self.text_encoder.embed, DROPOUT)
        self.spatial_graph = PolarSpatialGraph(spatial_kernels)
        self.visual_kgid = KnowledgeGraphDissemination(embed_size, kgid_layers, self.lambda_softmax, float(scale))
        self.textual_kgid = KnowledgeGraphDissemination(embed_size, kgid_layers, self.lambda_softmax, float(scale))
        self.v_global_w = SelfAttentionPool(embed_size, DROPOUT, num_regions)
        self.t_global_w = SelfAttentionPool(embed_size, DROPOUT)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)  # W^l_d or W^l_c
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)  # W^g_d or W^g_c
        xavier_init(self.sim_tranloc_w)
        xavier_init(self.sim_tranglo_w)
        self.srgr = SimilarityRelationReconstruction(sim_dim)


    # ------------------------------------------------------------------ encoders
    def encode_image(self, features: Tensor, boxes: Tensor) -> ImageEncoding:
        """Region features ``(B, num_regions, img_dim)`` and boxes ``(B, num_regions, 4)`` (x1 y1 x2 y2 in [0, 1])."""
        if features.dim() != 3 or features.shape[1] != self.num_regions:
            raise ValueError(f"features must be (B, {self.num_regions}, img_dim) (num_regions = {self.num_regions}), "
                             f"got shape {tuple(features.shape)}")
        if boxes.shape != (*features.shape[:2], 4):
            raise ValueError(f"boxes must be (B, num_regions, 4) = {(*features.shape[:2], 4)}, got {tuple(boxes.shape)}")
        if not boxes.dtype.is_floating_point or not torch.isfinite(boxes).all():
            raise ValueError("boxes must be finite floating-point x1 y1 x2 y2, normalised by the image size")
        regions = self.image_encoder(features)
        if self.spatial_prior:
            prior = self.spatial_graph(boxes.to(regions.dtype))
        else:  # the ablation: every region pair equally near
            prior = regions.new_ones(regions.shape[0], regions.shape[1], regions.shape[1])
        edges = knowledge_edges(regions, prior, None, self.lambda_softmax)
        regions = self.visual_kgid(regions, edges, None)
        return regions, self.v_global_w(regions)

    def encode_text(self, ids: Tensor, lengths: Tensor, graphs: Sequence[dict] | Tensor) -> CaptionEncoding:
        """Token ids ``(B, L)``, lengths ``(B,)`` and dependency parses -> ``(words, lengths, global)``.

        ``graphs``: one caption graph per caption (``CaptionBatch.graphs``; only
        ``"heads"`` is read), or a ready dependency matrix ``(B, L, L)`` as
        :func:`dependency_matrix` builds it.
        """
        check_token_ids(ids, lengths, self.text_encoder.embed.num_embeddings)
        if isinstance(graphs, Tensor):
            if graphs.shape != (*ids.shape, ids.shape[1]):
                raise ValueError(f"a dependency matrix must be (B, L, L) = {(*ids.shape, ids.shape[1])}, "
                                 f"got {tuple(graphs.shape)}")
            prior = graphs
        else:
            prior = dependency_matrix(graphs, lengths, ids.shape[1])
        if not self.dependency_prior:  # the ablation: no arcs, self loops only
            prior = prior * torch.eye(ids.shape[1], dtype=prior.dtype, device=prior.device)
        words = self.text_encoder(ids, lengths)
        valid = valid_mask(lengths.to(words.device), ids.shape[1])
        pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # padded words take no part in the graph
        edges = knowledge_edges(words, prior.to(words).masked_fill(~pairs, 0), valid, self.lambda_softmax)
        words = self.textual_kgid(words, edges, valid)
        return words, lengths, self.t_global_w(words, lengths.to(words.device))

    def encode_images(self, images: ImageBatch) -> ImageEncoding:
        if images.boxes is None:
            raise ValueError("MPSM needs region boxes: load the split with boxes=True (MPSM.data_requirements)")
        return self.encode_image(images.features, images.boxes)

    def encode_captions(self, captions: CaptionBatch) -> CaptionEncoding:
        if captions.graphs is None:
            raise ValueError("MPSM needs caption dependency parses: load the split with caption_graphs=True "
                             "(MPSM.data_requirements)")
        return self.encode_text(captions.ids, captions.lengths, captions.graphs)

    # ------------------------------------------------------------------ similarity
    def _nodes(self, regions: Tensor, img_glo: Tensor, words: Tensor, cap_glo: Tensor,
               lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Global ``(C, I, m)`` and local ``(C, I, L, m)`` similarity vectors (Eq. 10-15) of every pair."""
        local = cross_attention(
            words, regions, query_lens=lengths, smooth=self.lambda_softmax, epilogue=self.perspective,
            weight=self.sim_tranloc_w.weight, bias=self.sim_tranloc_w.bias, backend=self.backend,
        )
        glob = pairwise_similarity(cap_glo, img_glo, self.sim_tranglo_w.weight, self.sim_tranglo_w.bias,
                                   self.perspective, backend=self.backend)
        return glob, local

    def similarity(
        self, images: ImageEncoding, captions: CaptionEncoding, *, chunk_nodes: int | None = None
    ) -> Tensor:
        """Scores ``(n_image, n_caption)`` of every pair of the encodings, in (0, 1).

        Captions are scored in length-sorted chunks of at most ``chunk_nodes``
        similarity nodes (captions x images x (words + 1)), at least one caption each
        (default: :func:`~sgfused.models.caption_chunks.default_chunk_nodes` of the device).
        """
        regions, img_glo = self._check_image_encoding(images)
        words, lengths, cap_glo = self._check_caption_encoding(captions)
        lengths = lengths.to(words.device)
        words = words.masked_fill(~valid_mask(lengths, words.shape[1]).unsqueeze(-1), 0)
        recompute = not self.reference and torch.is_grad_enabled()
        host_lengths = lengths.tolist()
        order = sorted(range(len(host_lengths)), key=host_lengths.__getitem__)
        columns, stats = [], []
        chunk_nodes = default_chunk_nodes(regions.device) if chunk_nodes is None else chunk_nodes
        for chunk in caption_chunks(order, host_lengths, regions.shape[0], chunk_nodes):
            index = torch.tensor(chunk, device=words.device)
            chunk_lengths = lengths[index]
            glob, local = self._nodes(regions, img_glo, words[index, : host_lengths[chunk[-1]]], cap_glo[index],
                                      chunk_lengths)
            if recompute:
                scores, chunk_stats = checkpoint(self.srgr, glob, local, chunk_lengths, use_reentrant=False)
            else:
                scores, chunk_stats = self.srgr(glob, local, chunk_lengths)
            columns.append(scores)
            stats.append(chunk_stats)
        inverse = torch.argsort(torch.tensor(order, device=words.device))
        if stats[0] is not None:
            out_mean, out_var, in_mean, in_var = (torch.cat(part)[inverse] for part in zip(*stats))
            update_running_stats(self.srgr.out_bn, out_mean, out_var)
            update_running_stats(self.srgr.in_bn, in_mean, in_var)
        return torch.cat(columns).index_select(0, inverse).t()


    # ------------------------------------------------------------------ checks
    def _check_image_encoding(self, images: Any) -> ImageEncoding:
        if not isinstance(images, tuple) or len(images) != 2:
            raise TypeError("images must be the (regions, global) encoding of encode_images / encode_image")
        regions, glob = images
        r, d = self.num_regions, self.embed_size
        if regions.dim() != 3 or regions.shape[1:] != (r, d) or glob.shape != (regions.shape[0], d):
            raise ValueError(f"image encoding must be regions (n_image, {r}, {d}) and global (n_image, {d}), "
                             f"got {tuple(regions.shape)} and {tuple(glob.shape)}")
        if regions.shape[0] == 0:
            raise ValueError("need at least one image, got an empty image encoding")
        return regions, glob

    def _check_caption_encoding(self, captions: Any) -> CaptionEncoding:
        if not isinstance(captions, tuple) or len(captions) != 3:
            raise TypeError("captions must be the (words, lengths, global) encoding of encode_captions / encode_text")
        words, lengths, glob = captions
        d = self.embed_size
        if words.dim() != 3 or words.shape[2] != d or lengths.shape != words.shape[:1] or glob.shape != (words.shape[0], d):
            raise ValueError(f"caption encoding must be words (n_caption, L, {d}), lengths (n_caption,) and global "
                             f"(n_caption, {d}), got {tuple(words.shape)}, {tuple(lengths.shape)} and {tuple(glob.shape)}")
        if words.shape[0] == 0:
            raise ValueError("need at least one caption, got an empty caption encoding")
        check_lengths(lengths, words.shape[1])
        return words, lengths, glob
