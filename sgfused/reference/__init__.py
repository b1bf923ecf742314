"""Pure-PyTorch ground truth for every op: readable, exact, slow. Depends on nothing but torch."""

from .cross_attention import cross_attention
from .hardest_negative import hardest_negative_embed_terms, hardest_negative_terms, vsepp_contrastive_loss
from .max_sim import max_sim
from .pairwise_similarity import l2norm, pairwise_similarity

__all__ = [
    "cross_attention",
    "hardest_negative_terms",
    "hardest_negative_embed_terms",
    "vsepp_contrastive_loss",
    "l2norm",
    "max_sim",
    "pairwise_similarity",
]
