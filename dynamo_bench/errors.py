"""dynamo-bench's typed error, a DynaMoError like every error of the PyTorch tool chain."""

from dynamo_export.errors import DynaMoError


class BenchError(DynaMoError):
    """dynamo-bench was given options, prompts or models it cannot benchmark (the message says which)."""
