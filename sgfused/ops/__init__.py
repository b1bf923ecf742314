"""Public functional ops: input checks, backend choice, autograd; the kernels do the work."""

from . import hardest_negative as _hardest_negative
from .hardest_negative import hardest_negative_loss, hardest_negative_loss_from_embeddings

_hardest_negative.register()

__all__ = ["hardest_negative_loss", "hardest_negative_loss_from_embeddings"]
