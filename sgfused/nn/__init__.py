"""Drop-in nn.Module wrappers of the ops."""

from .losses import HardestNegativeLoss
from .similarity import CrossAttentionSimilarity, VectorSimilarity

__all__ = ["CrossAttentionSimilarity", "HardestNegativeLoss", "VectorSimilarity"]
