"""Drop-in nn.Module wrappers of the ops."""

from .losses import HardestNegativeLoss
from .similarity import VectorSimilarity

__all__ = ["HardestNegativeLoss", "VectorSimilarity"]
