"""Drop-in nn.Module wrappers of the ops."""

from .losses import HardestNegativeLoss

__all__ = ["HardestNegativeLoss"]
