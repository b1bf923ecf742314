"""Drop-in nn.Module wrappers of the ops."""

from .losses import HardestNegativeLoss
from .similarity import CrossAttentionSimilarity, MaxSim, VectorSimilarity

__all__ = ["CrossAttentionSimilarity", "HardestNegativeLoss", "MaxSim", "VectorSimilarity"]
