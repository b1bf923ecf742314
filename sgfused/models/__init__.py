"""Retrieval models built on :mod:`sgfused.ops`, buildable by name for the trainer and the command line."""

from .base import RetrievalModel
from .registry import available_models, build_model, model_class, register_model
from .cmsei import CMSEI
from .mpsm import MPSM
from .sgfn import SGFN
from .sgm import SGM
from .sgraf import SGRAF
from .vsepp import VSEPP

__all__ = ["CMSEI", "MPSM", "RetrievalModel", "SGFN", "SGM", "SGRAF", "VSEPP", "available_models", "build_model", "model_class", "register_model"]
