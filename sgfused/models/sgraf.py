"""SGRAF (Diao et al., AAAI 2021): similarity graph reasoning (SGR) and attention filtration (SAF).

Every (image, caption) pair gets one global similarity vector (self-attended
image vs caption, ``pairwise_similarity`` "distance") and one local vector per
word (SCAN text-to-image attention, ``cross_attention`` "distance"); SGR
reasons over the graph of these nodes for ``sgr_step`` steps and reads the
global node, SAF gates and averages the nodes; ``sigmoid(sim_eval_w(.))`` is
the score. The published code (github.com/Paranioar/SGRAF, ``model.py``) loops
over captions in Python and rebuilds ``(n_image, L, d)`` tensors for each; here
:meth:`SGRAF.similarity` scores all pairs at once through :mod:`sgfused.ops`,
in chunks of length-sorted captions (each chunk trimmed to its own longest
caption) to bound memory. :func:`sgraf_loop_similarity` keeps the published
per-caption computation as the baseline the batched one is tested and
benchmarked against; ``reference=True`` runs the batched code on the
reference ops.

Where the batched computation differs in form from the published code, and why
(none of it changes a score beyond float rounding):

* Padding. The published loop slices every caption to its length; here padded
  words are zeroed on entry and masked out of the text self-attention, the SGR
  edge softmax (as keys) and the SAF weights, so padding never reaches a score.
* SGR edges. ``softmax_j((W_q s_i + b_q) . (W_k s_j + b_k))`` is computed as
  ``softmax_j((s_i A + b_q W_k) . s_j)`` with ``A = W_q^T W_k``: the dropped terms
  are constant in ``j`` and cancel in the softmax. One ``m x m`` product per node
  instead of two, and the last step computes the global node only (the only
  one read). Consequence: ``graph_key_w.bias``, which provably has no effect on
  any output, receives no gradient (``None``) instead of rounding noise
  (distributed training must allow unused parameters).
* SAF BatchNorm. The published loop calls ``BatchNorm1d(1)`` once per caption,
  so in training it normalises with the statistics of that caption's
  ``n_image x (L + 1)`` node weights and updates the running statistics once per
  caption, in caption order. The batched code does exactly that: per-caption
  masked statistics, and the same running-statistics update in closed form.
* Memory. With gradients on, the fused path keeps none of the reasoning's
  ``(captions, images, L + 1, sim_dim)`` intermediates: SGR runs as one
  autograd function (:mod:`sgfused.models.sgr_reasoning`) that keeps the input
  nodes and each step's ``(L + 1)^2`` attention and rebuilds the rest in its
  backward; SAF recomputes its (cheap) forward in the backward pass
  (activation checkpointing).
* Regions. The published ``VisualSA`` hard-codes 36 regions (its
  ``BatchNorm1d(36)``); ``num_regions`` makes that a setting (default 36).
* Word-embedding dropout (0.4, before the GRU) and the self-attention dropout
  (0.4) follow the published code; the paper does not mention them.

``similarity(..., dtype=torch.bfloat16)`` feeds bf16 to the similarity ops and SGR's
matrix products and runs the global vectors' self-attention pools under bf16 autocast
(SAF's attention and the scores stay fp32), for evaluation.
Published checkpoints load with :meth:`SGRAF.from_official` (``weights_only``
unpickling, ``argparse.Namespace`` the only extra type) and are written by
:meth:`SGRAF.to_official`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sized
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
from .registry import build_model, register_model
from .sgr_reasoning import sgr_global_node
from .similarity_common import caption_batch_norm, update_running_stats

MODULES = ("SGR", "SAF")
DROPOUT = 0.4  # the published code's dropout on word embeddings and in the self-attention branches
# Official state-dict parts, in checkpoint order: (our module prefix, published renames of its keys).
_OFFICIAL_PARTS = (("image_encoder.", {}), ("text_encoder.", {"rnn.": "cap_rnn."}), ("sim_encoder.", {}))


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)`` in the dtype of ``x`` (the bf16 evaluation path keeps fp32 parameters)."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


def _masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    return torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)


class _EmbeddingWithDropout(nn.Embedding):
    """A word embedding followed by dropout (the published text encoder drops 40 % of its entries)."""

    def __init__(self, embedding: nn.Embedding, p: float) -> None:
        super().__init__(embedding.num_embeddings, embedding.embedding_dim)
        self.weight = embedding.weight
        self.dropout = nn.Dropout(p)

    def forward(self, ids: Tensor) -> Tensor:
        return self.dropout(super().forward(ids))


class SelfAttentionPool(nn.Module):
    """Global vector of a set of local features, attended with their mean as the query (SGRAF VisualSA / TextSA).

    ``w = softmax(common(local_branch(v_k) * global_branch(mean_k v_k)))`` over valid
    positions, output ``l2norm(sum_k w_k v_k)``. Each branch is
    Linear -> [BatchNorm1d] -> Tanh -> Dropout; the image version (``num_regions``
    given) normalises the local branch per region slot and the global branch per
    feature, the text version has no BatchNorm. Submodule names follow the
    published ``v_global_w`` / ``t_global_w``.
    """

    def __init__(self, embed_size: int, dropout: float, num_regions: int | None = None) -> None:
        super().__init__()

        def branch(norm_size: int | None) -> nn.Sequential:
            norm = [nn.BatchNorm1d(norm_size)] if norm_size is not None else []
            return nn.Sequential(nn.Linear(embed_size, embed_size), *norm, nn.Tanh(), nn.Dropout(dropout))

        self.embedding_local = branch(num_regions)
        self.embedding_global = branch(embed_size if num_regions is not None else None)
        self.embedding_common = nn.Sequential(nn.Linear(embed_size, 1))
        xavier_init(self)

    def forward(self, local: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``local (B, K, d)`` (zero past ``lengths`` when given) -> ``(B, d)``."""
        if lengths is None:
            query, valid = local.mean(dim=1), None
        else:
            valid = valid_mask(lengths, local.shape[1])
            query = local.sum(dim=1) / lengths.to(local.dtype).unsqueeze(-1)
        common = self.embedding_local(local) * self.embedding_global(query).unsqueeze(1)
        logits = self.embedding_common(common).squeeze(-1)
        weights = torch.softmax(logits, dim=1) if valid is None else _masked_softmax(logits, valid)
        return l2norm((weights.unsqueeze(-1) * local).sum(dim=1))


class GraphReasoning(nn.Module):
    """One SGR step on fully connected similarity graphs: ``relu(W_g softmax(q k^T) s)``.

    Nodes are ``(..., N, m)`` with a key mask broadcastable to ``(..., N)``
    (padded nodes never receive weight). Names follow the published module.
    """

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        xavier_init(self)

    def edge_parameters(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A, c, W_g, b_g)`` in ``dtype``, with ``A = W_q^T W_k`` and ``c = b_q W_k`` (module doc).

        The edge queries are ``s A + c``; the step's output is ``relu((E s) W_g^T + b_g)``.
        """
        wq, wk = self.graph_query_w.weight, self.graph_key_w.weight
        params = (wq.t() @ wk, self.graph_query_w.bias @ wk, self.sim_graph_w.weight, self.sim_graph_w.bias)
        return tuple(p.to(dtype) for p in params)  # type: ignore[return-value]

    def _edge_queries(self, nodes: Tensor) -> Tensor:
        """``q_i W_k`` = ``s_i A + c``: the query side of the edge logits."""
        a, c, _, _ = self.edge_parameters(nodes.dtype)
        return torch.addmm(c, nodes.flatten(0, -2), a).view_as(nodes)

    def forward(self, nodes: Tensor, valid: Tensor) -> Tensor:
        """All nodes after one step, ``(..., N, m)``."""
        logits = self._edge_queries(nodes) @ nodes.transpose(-1, -2)  # (..., N, N)
        edges = _masked_softmax(logits, valid.unsqueeze(-2))
        return F.relu(_linear(edges @ nodes, self.sim_graph_w))

    def global_node(self, nodes: Tensor, valid: Tensor) -> Tensor:
        """Node 0 (the global alignment) after one step, ``(..., m)``: all a final step needs."""
        query = self._edge_queries(nodes[..., :1, :])  # (..., 1, m)
        edges = _masked_softmax((query @ nodes.transpose(-1, -2)).squeeze(-2), valid)  # (..., N)
        return F.relu(_linear((edges.unsqueeze(-2) @ nodes).squeeze(-2), self.sim_graph_w))


class AttentionFiltration(nn.Module):
    """SAF: ``l2norm(sum_j g_j s_j)`` with ``g = l1norm(sigmoid(BN(W s)))`` over the valid nodes.

    In training the BatchNorm uses, for every caption, the statistics of that
    caption's gate logits over all images and valid nodes, as the published
    per-caption loop does (module doc); in evaluation its running statistics.
    It runs in fp32 whatever the nodes' dtype: it is cheap next to the similarity
    ops, and bf16 gates moved R@1 on the synthetic test split.
    """

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        xavier_init(self)

    def forward(
        self, glob: Tensor, local: Tensor, valid: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Nodes ``glob (C, I, m)`` then ``local (C, I, L, m)``, ``valid (C, 1, L + 1)`` -> ``(C, I, m)``.

        Training also returns the per-caption (mean, unbiased var) of the gate logits.
        The node set is never concatenated: the global node's share is added apart.
        """
        glob, local = glob.float(), local.float()
        logits = torch.cat([self.attn_sim_w(glob.unsqueeze(2)), self.attn_sim_w(local)], dim=2).squeeze(-1)
        normed, stats = caption_batch_norm(logits, valid, self.bn, self.training)  # (C, I, L + 1)
        gates = torch.sigmoid(normed).masked_fill(~valid, 0)
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-8)  # the published l1norm (eps 1e-8)
        vector = gates[..., :1] * glob + (gates[..., 1:].unsqueeze(-2) @ local).squeeze(-2)
        return l2norm(vector), stats

    def update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply one BatchNorm running-statistics update per caption, in order, in closed form."""
        update_running_stats(self.bn, means, variances)


class SimilarityEncoder(nn.Module):
    """The published ``EncoderSimilarity``: global / local similarity vectors, SGR or SAF, and the score layer."""

    def __init__(self, embed_size: int, sim_dim: int, module: str, sgr_step: int, num_regions: int) -> None:
        super().__init__()
        self.module_name = module
        self.v_global_w = SelfAttentionPool(embed_size, DROPOUT, num_regions)
        self.t_global_w = SelfAttentionPool(embed_size, DROPOUT)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        xavier_init(self.sim_tranloc_w)
        xavier_init(self.sim_tranglo_w)
        xavier_init(self.sim_eval_w)
        if module == "SGR":
            self.SGR_module = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(sgr_step))
        else:
            self.SAF_module = AttentionFiltration(sim_dim)

    def nodes(self, regions: Tensor, img_glo: Tensor, words: Tensor, cap_glo: Tensor, lengths: Tensor,
              smooth: float, backend: str) -> tuple[Tensor, Tensor]:
        """Global ``(C, I, m)`` and local ``(C, I, L, m)`` similarity vectors of every (caption, image) pair."""
        dtype = words.dtype
        local = cross_attention(
            words, regions, query_lens=lengths, smooth=smooth, epilogue="distance",
            weight=self.sim_tranloc_w.weight.to(dtype), bias=self.sim_tranloc_w.bias.to(dtype), backend=backend,
        )
        glob = pairwise_similarity(
            cap_glo, img_glo, self.sim_tranglo_w.weight.to(dtype), self.sim_tranglo_w.bias.to(dtype), "distance",
            backend=backend,
        )
        return glob, local

    def reason(
        self, glob: Tensor, local: Tensor, lengths: Tensor, fused: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Scores ``(C, I)`` (fp32), and SAF's per-caption BatchNorm statistics in training.

        ``fused`` runs SGR as one :class:`~sgfused.models.sgr_reasoning.SGRReasoning`
        (memory-light backward); otherwise step by step under autograd.
        """
        positions = torch.arange(local.shape[2] + 1, device=lengths.device)  # node 0 is the global one
        valid = (positions <= lengths[:, None]).unsqueeze(1)  # (C, 1, L + 1)
        stats = None
        if self.module_name == "SGR":
            if fused:
                params = [step.edge_parameters(local.dtype) for step in self.SGR_module]
                vector = sgr_global_node(glob, local, valid, params)
            else:
                nodes = torch.cat([glob.unsqueeze(2), local], dim=2)  # (C, I, L + 1, m)
                for step in self.SGR_module[:-1]:
                    nodes = step(nodes, valid)
                vector = self.SGR_module[-1].global_node(nodes, valid)
        else:
            vector, stats = self.SAF_module(glob, local, valid)
        return torch.sigmoid(_linear(vector, self.sim_eval_w)).squeeze(-1).float(), stats


@register_model("sgraf")
class SGRAF(RetrievalModel):
    """Similarity Graph Reasoning and Attention Filtration, one module (SGR or SAF) per model.

    The paper's SGRAF score is the average of an SGR and a SAF model trained
    separately (``sgfused.evaluate.ensemble``). Options follow the published
    ``opts.py``; ``lambda_softmax`` is the attention temperature (9), ``num_regions``
    the region count the image self-attention's BatchNorm is built for, and
    ``reference=True`` computes similarities (and the loss) with the reference ops.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        module: str = "SGR",
        embed_size: int = 1024,
        word_dim: int = 300,
        sim_dim: int = 256,
        sgr_step: int = 3,
        lambda_softmax: float = 9.0,
        margin: float = 0.2,
        max_violation: bool = True,
        img_dim: int = 2048,
        num_layers: int = 1,
        bi_gru: bool = True,
        no_imgnorm: bool = False,
        no_txtnorm: bool = False,
        num_regions: int = 36,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, got {module!r}")
        if module == "SGR" and sgr_step < 1:
            raise ValueError(f"sgr_step must be at least 1, got {sgr_step}")
        self.embed_size, self.num_regions, self.lambda_softmax = embed_size, num_regions, float(lambda_softmax)
        self.margin, self.max_violation, self.reference = float(margin), bool(max_violation), bool(reference)
        self.image_encoder = RegionEncoder(img_dim, embed_size, normalize=not no_imgnorm)
        self.text_encoder = GRUTextEncoder(
            vocab_size, word_dim, embed_size, num_layers, bi_gru, normalize=not no_txtnorm
        )
        self.text_encoder.embed = _EmbeddingWithDropout(self.text_encoder.embed, DROPOUT)
        self.sim_encoder = SimilarityEncoder(embed_size, sim_dim, module, sgr_step, num_regions)


    # ------------------------------------------------------------------ encoders
    def encode_image(self, features: Tensor) -> Tensor:
        """Region features ``(B, num_regions, img_dim)`` -> region embeddings ``(B, num_regions, embed_size)``."""
        if features.dim() != 3 or features.shape[1] != self.num_regions:
            raise ValueError(
                f"features must be (B, {self.num_regions}, img_dim) (num_regions = {self.num_regions}), "
                f"got shape {tuple(features.shape)}"
            )
        return self.image_encoder(features)

    def encode_text(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Token ids ``(B, L)`` with lengths ``(B,)`` -> word features ``(B, L, embed_size)``, zero past each length."""
        check_token_ids(ids, lengths, self.text_encoder.embed.num_embeddings)
        return self.text_encoder(ids, lengths)

    def encode_images(self, images: ImageBatch) -> Tensor:
        return self.encode_image(images.features)

    def encode_captions(self, captions: CaptionBatch) -> tuple[Tensor, Tensor]:
        return self.encode_text(captions.ids, captions.lengths), captions.lengths

    # ------------------------------------------------------------------ similarity
    def similarity(
        self,
        images: Tensor,
        captions: Tensor | tuple[Tensor, Tensor],
        lengths: Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        chunk_nodes: int | None = None,
    ) -> Tensor:
        """Scores ``(n_image, n_caption)`` of every pair, in [0, 1].

        Call as ``similarity(regions, words, lengths)`` or, with the encodings of
        :meth:`encode_images` / :meth:`encode_captions`, ``similarity(regions, (words, lengths))``.
        ``regions (n_image, num_regions, d)``, ``words (n_caption, L, d)`` (values past
        each length are ignored), ``lengths (n_caption,)``. ``dtype`` (e.g.
        ``torch.bfloat16``) is the input dtype of the similarity ops and of SGR's
        matrix products (default: that of ``regions``), and the self-attention pools of the
        global vectors run under autocast to it; SAF's attention and the scores stay fp32. Captions are scored in length-sorted chunks of at most
        ``chunk_nodes`` similarity nodes (captions x images x (words + 1)), at least one caption each
        (default: :func:`~sgfused.models.caption_chunks.default_chunk_nodes` of the device).
        """
        regions, words, lengths = _unpack(images, captions, lengths)
        self._check_encodings(regions, words, lengths)
        lengths = lengths.to(words.device)
        dtype = dtype or regions.dtype
        chunk_nodes = default_chunk_nodes(regions.device) if chunk_nodes is None else chunk_nodes
        valid = valid_mask(lengths, words.shape[1])
        words = words.masked_fill(~valid.unsqueeze(-1), 0)
        with torch.autocast(regions.device.type, dtype=dtype, enabled=dtype != regions.dtype):
            img_glo = self.sim_encoder.v_global_w(regions)
            cap_glo = self.sim_encoder.t_global_w(words, lengths)
        regions_c, img_glo_c = regions.to(dtype), img_glo.to(dtype)
        fused = not self.reference
        recompute = fused and torch.is_grad_enabled() and self.sim_encoder.module_name == "SAF"
        host_lengths = lengths.tolist()
        order = sorted(range(len(host_lengths)), key=host_lengths.__getitem__)
        columns, stats = [], []
        for chunk in caption_chunks(order, host_lengths, regions.shape[0], chunk_nodes):
            index = torch.tensor(chunk, device=words.device)
            longest = host_lengths[chunk[-1]]
            chunk_lengths = lengths[index]
            glob, local = self.sim_encoder.nodes(
                regions_c, img_glo_c, words[index, :longest].to(dtype), cap_glo[index].to(dtype), chunk_lengths,
                self.lambda_softmax, self.backend,
            )
            if recompute:
                scores, chunk_stats = checkpoint(
                    self.sim_encoder.reason, glob, local, chunk_lengths, fused, use_reentrant=False
                )
            else:
                scores, chunk_stats = self.sim_encoder.reason(glob, local, chunk_lengths, fused)
            columns.append(scores)
            stats.append(chunk_stats)
        inverse = torch.argsort(torch.tensor(order, device=words.device))
        if stats[0] is not None:
            means, variances = (torch.cat(part)[inverse] for part in zip(*stats))
            self.sim_encoder.SAF_module.update_running_stats(means, variances)
        return torch.cat(columns).index_select(0, inverse).t()


    def _check_encodings(self, regions: Tensor, words: Tensor, lengths: Tensor) -> None:
        d = self.embed_size
        if regions.dim() != 3 or regions.shape[1:] != (self.num_regions, d):
            raise ValueError(f"regions must be (n_image, {self.num_regions}, {d}), got shape {tuple(regions.shape)}")
        if words.dim() != 3 or words.shape[2] != d:
            raise ValueError(f"words must be (n_caption, L, {d}), got shape {tuple(words.shape)}")
        if lengths.shape != words.shape[:1]:
            raise ValueError(f"lengths must be (n_caption,) = ({words.shape[0]},), got shape {tuple(lengths.shape)}")
        if regions.shape[0] == 0 or words.shape[0] == 0:
            raise ValueError(f"need at least one image and one caption, got {regions.shape[0]} and {words.shape[0]}")
        check_lengths(lengths, words.shape[1])

    # ------------------------------------------------------------------ published checkpoints
    def official_options(self) -> argparse.Namespace:
        """The published ``opts.py`` options that describe this model (what :meth:`to_official` stores)."""
        sim, text, rnn = self.sim_encoder, self.text_encoder, self.text_encoder.rnn
        return argparse.Namespace(
            module_name=sim.module_name, embed_size=self.embed_size, sim_dim=sim.sim_eval_w.in_features,
            word_dim=text.embed.embedding_dim, sgr_step=len(sim.SGR_module) if sim.module_name == "SGR" else 3,
            num_layers=rnn.num_layers, bi_gru=rnn.bidirectional, img_dim=self.image_encoder.fc.in_features,
            vocab_size=text.embed.num_embeddings, no_imgnorm=not self.image_encoder.normalize,
            no_txtnorm=not text.normalize, lambda_softmax=self.lambda_softmax, margin=self.margin,
            max_violation=self.max_violation,
        )

    def official_state_dict(self) -> list[dict[str, Tensor]]:
        """``[img_enc, txt_enc, sim_enc]`` state dicts with the published key names."""
        ours = self.state_dict()
        parts = []
        for prefix, renames in _OFFICIAL_PARTS:
            part = {}
            for key, value in ours.items():
                if key.startswith(prefix):
                    part[_rename(key[len(prefix):], renames)] = value
            parts.append(part)
        return parts

    def to_official(self, path: str | os.PathLike, epoch: int = 0) -> None:
        """Write a checkpoint in the published layout: ``{'model': [img, txt, sim], 'opt': Namespace, 'epoch'}``.

        ``epoch`` is stored because the published ``evaluation.py`` prints it.
        """
        torch.save({"model": self.official_state_dict(), "opt": self.official_options(), "epoch": epoch}, path)

    @classmethod
    def from_official(cls, path: str | os.PathLike, vocab: str | os.PathLike | Sized | None = None) -> "SGRAF":
        """A model from a checkpoint released with the paper's code (or written by :meth:`to_official`).

        The file is read with ``torch.load(weights_only=True)``, allowing
        ``argparse.Namespace`` as the only extra type: nothing from the published code
        is imported or executed. ``vocab`` (a vocabulary json path, or a loaded
        vocabulary) is checked against the embedding's row count. Loads on the CPU;
        the model is returned in evaluation mode.
        """
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint_ = torch.load(path, map_location="cpu", weights_only=True)
        parts, opt = _official_contents(checkpoint_, os.fspath(path))
        rows = _official_tensor(parts[1], "embed.weight", 1).shape[0]
        if getattr(opt, "vocab_size", rows) != rows:
            raise ValueError(f"{os.fspath(path)}: opt.vocab_size = {opt.vocab_size} but embed.weight has {rows} rows")
        if vocab is not None:
            vocab_size = len(_load_vocabulary(vocab) if isinstance(vocab, (str, os.PathLike)) else vocab)
            if vocab_size != rows:
                raise ValueError(
                    f"vocabulary has {vocab_size} words but the checkpoint's word embedding has {rows} rows: "
                    "use the vocabulary json released with this checkpoint"
                )
        config = _official_config(opt, parts)
        model = build_model(cls.registry_name, rows, config)
        model.load_official_state_dict(parts)
        return model.eval()

    def load_official_state_dict(self, parts: list[dict[str, Tensor]]) -> None:
        """Load ``[img_enc, txt_enc, sim_enc]`` state dicts with the published key names (strict)."""
        state = {}
        for (prefix, renames), part in zip(_OFFICIAL_PARTS, parts):
            back = {new: old for old, new in renames.items()}
            state.update({prefix + _rename(key, back): value for key, value in part.items()})
        # checkpoints older than BatchNorm's num_batches_tracked buffer (PyTorch < 0.4.1) lack it
        for key, value in self.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, value)
        self.load_state_dict(state, strict=True)


def _unpack(
    images: Tensor, captions: Tensor | tuple[Tensor, Tensor], lengths: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(captions, tuple):
        if lengths is not None or len(captions) != 2:
            raise TypeError("captions: pass either (words, lengths) as one tuple or words and lengths separately")
        captions, lengths = captions
    if lengths is None:
        raise TypeError("similarity needs caption lengths: similarity(regions, words, lengths)")
    return images, captions, lengths


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _official_contents(checkpoint_: Any, source: str) -> tuple[list[dict[str, Tensor]], argparse.Namespace]:
    if not isinstance(checkpoint_, dict) or "model" not in checkpoint_ or "opt" not in checkpoint_:
        got = sorted(checkpoint_) if isinstance(checkpoint_, dict) else type(checkpoint_).__name__
        raise ValueError(f"{source}: expected a published SGRAF checkpoint (a dict with 'model' and 'opt'), got {got}")
    parts, opt = checkpoint_["model"], checkpoint_["opt"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(isinstance(p, dict) for p in parts):
        raise ValueError(f"{source}: 'model' must be a list of three state dicts [img_enc, txt_enc, sim_enc]")
    opt = argparse.Namespace(**opt) if isinstance(opt, dict) else opt
    if not isinstance(opt, argparse.Namespace):
        raise ValueError(f"{source}: 'opt' must be an argparse.Namespace, got {type(opt).__name__}")
    return list(parts), opt


def _official_tensor(part: dict[str, Tensor], key: str, index: int) -> Tensor:
    if key not in part:
        raise ValueError(f"published checkpoint: state dict {index} has no {key!r} (keys: {sorted(part)[:8]} ...)")
    return part[key]


def _official_config(opt: argparse.Namespace, parts: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Our constructor options from the published ``opt`` (defaults where an old checkpoint lacks one)."""
    names = ("embed_size", "word_dim", "sim_dim", "sgr_step", "lambda_softmax", "margin", "max_violation",
             "img_dim", "num_layers", "bi_gru", "no_imgnorm", "no_txtnorm")
    config = {name: getattr(opt, name) for name in names if hasattr(opt, name)}
    if not hasattr(opt, "module_name"):
        raise ValueError("published checkpoint: opt has no module_name ('SGR' or 'SAF')")
    config["module"] = opt.module_name
    config["num_regions"] = _official_tensor(parts[2], "v_global_w.embedding_local.1.weight", 2).shape[0]
    return config


def _load_vocabulary(path: str | os.PathLike) -> Sized:
    from ..data.vocab import Vocabulary

    return Vocabulary.load(path)


# ---------------------------------------------------------------------------- the published computation
def _scan_attention(words: Tensor, regions: Tensor, smooth: float, eps: float = 1e-8) -> Tensor:
    """SCAN text-to-image attention of one caption's words ``(I, n, d)`` over regions ``(I, K, d)``, as published."""
    attn = F.leaky_relu(regions @ words.transpose(1, 2), 0.1)  # (I, K, n)
    attn = l2norm(attn, eps)  # over the words
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # (I, n, K)
    return l2norm(attn @ regions, eps)


def sgraf_loop_similarity(model: SGRAF, regions: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
    """Scores ``(n_image, n_caption)`` computed as the published ``EncoderSimilarity.forward``: one caption at a time.

    Each caption is sliced to its length and compared with all images: SCAN
    attention, ``(context - word)^2`` through ``sim_tranloc_w``, the global pair
    through ``sim_tranglo_w``, then SGR with explicit query / key projections over
    all nodes at every step, or SAF with its BatchNorm module called per caption.
    Plain PyTorch, no :mod:`sgfused.ops`; the baseline of the tests and benchmarks.
    """
    sim = model.sim_encoder
    img_glo = sim.v_global_w(regions)
    columns = []
    for i, n_word in enumerate(lengths.tolist()):
        cap = words[i : i + 1, :n_word]
        cap_glo = sim.t_global_w(cap)
        cap_expand = cap.expand(regions.shape[0], -1, -1)
        local = (_scan_attention(cap_expand, regions, model.lambda_softmax) - cap_expand).pow(2)
        local = l2norm(sim.sim_tranloc_w(local))
        glob = l2norm(sim.sim_tranglo_w((img_glo - cap_glo).pow(2)))
        nodes = torch.cat([glob.unsqueeze(1), local], dim=1)  # (I, n + 1, m)
        if sim.module_name == "SGR":
            for step in sim.SGR_module:
                edges = torch.softmax(step.graph_query_w(nodes) @ step.graph_key_w(nodes).transpose(1, 2), dim=-1)
                nodes = F.relu(step.sim_graph_w(edges @ nodes))
            vector = nodes[:, 0]
        else:
            saf = sim.SAF_module
            gates = torch.sigmoid(saf.bn(saf.attn_sim_w(nodes).transpose(1, 2)))  # (I, 1, n + 1)
            gates = gates / (gates.abs().sum(dim=-1, keepdim=True) + 1e-8)
            vector = l2norm((gates @ nodes).squeeze(1))
        columns.append(torch.sigmoid(sim.sim_eval_w(vector)))
    return torch.cat(columns, dim=1)
