"""dynamo-export, PyTorch side: the DynaMo model, conversion, training, evaluation.

The model classes are imported lazily so that data tools (`dynamo-data`,
`dynamo-cooccur`) start without paying for torch and transformers.
"""

__all__ = ["DynaMoConfig", "DynaMoForCausalLM", "DynaMoOutput"]


def __getattr__(name: str):
    if name == "DynaMoConfig":
        from dynamo_export.config import DynaMoConfig

        return DynaMoConfig
    if name in ("DynaMoForCausalLM", "DynaMoOutput"):
        from dynamo_export import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'dynamo_export' has no attribute {name!r}")
