"""Public functional ops: input checks, backend choice, autograd; the kernels do the work.

:data:`OPS` is the one list of op modules (docs/adding_an_op.md): each module
``sgfused/ops/<name>.py`` has a ``register()`` run here and a test file
``python_tests/test_<name>.py``; scripts/check_triton_compile.sh reads the list.
"""

from importlib import import_module

from .cross_attention import cross_attention
from .hardest_negative import hardest_negative_loss, hardest_negative_loss_from_embeddings
from .max_sim import max_sim
from .pairwise_similarity import pairwise_similarity

OPS = ("cross_attention", "hardest_negative", "max_sim", "pairwise_similarity")

for _name in OPS:
    import_module(f"{__name__}.{_name}").register()

__all__ = [
    "OPS",
    "cross_attention",
    "hardest_negative_loss",
    "hardest_negative_loss_from_embeddings",
    "max_sim",
    "pairwise_similarity",
]
