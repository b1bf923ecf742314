"""sgfused: fused kernels for scene-graph and similarity-reasoning image-text retrieval.

Importing the package loads the compiled operators (``torch.ops.sgfused.*``) and
checks that they were built for the installed torch.
"""

from ._build import build_info, load as _load

_load()

from . import nn, ops, reference  # noqa: E402  (the operators must be registered first)
from ._backend import BackendUnavailable, forget_measurements, measured_choices  # noqa: E402

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "nn", "reference", "BackendUnavailable", "measured_choices", "forget_measurements",
           "__version__"]
