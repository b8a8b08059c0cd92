"""dynamo-export, PyTorch side: the DynaMo model, conversion, training, evaluation."""

from dynamo_export.config import DynaMoConfig
from dynamo_export.modeling import DynaMoForCausalLM, DynaMoOutput

__all__ = ["DynaMoConfig", "DynaMoForCausalLM", "DynaMoOutput"]
