"""Public functional ops: input checks, backend choice, autograd; the kernels do the work."""

from . import hardest_negative as _hardest_negative
from . import pairwise_similarity as _pairwise_similarity
from .hardest_negative import hardest_negative_loss, hardest_negative_loss_from_embeddings
from .pairwise_similarity import pairwise_similarity

_hardest_negative.register()
_pairwise_similarity.register()

__all__ = ["hardest_negative_loss", "hardest_negative_loss_from_embeddings", "pairwise_similarity"]
