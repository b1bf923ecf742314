"""Public functional ops: input checks, backend choice, autograd; the kernels do the work."""

from . import cross_attention as _cross_attention
from . import hardest_negative as _hardest_negative
from . import pairwise_similarity as _pairwise_similarity
from .cross_attention import cross_attention
from .hardest_negative import hardest_negative_loss, hardest_negative_loss_from_embeddings
from .pairwise_similarity import pairwise_similarity

for _module in (_cross_attention, _hardest_negative, _pairwise_similarity):
    _module.register()

__all__ = ["cross_attention", "hardest_negative_loss", "hardest_negative_loss_from_embeddings", "pairwise_similarity"]
