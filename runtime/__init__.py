"""Torch-free DynaMo decoding on ONNX Runtime: imports only numpy, scipy, onnxruntime, tokenizers."""

from runtime.config import SamplingConfig
from runtime.cooccurrence import CooccurrenceMask
from runtime.engine import DynaMoRuntime, GenerationResult
from runtime.errors import (
    ApproximateVerifyWarning,
    ArtifactError,
    ArtifactFileError,
    CooccurrenceFileError,
    DynaMoRuntimeError,
    GenerationTimeout,
    GraphError,
    InferenceError,
    InputError,
    ManifestError,
    ProviderError,
    SamplingConfigError,
    SignatureError,
)
from runtime.generation import GenerationStats

__all__ = [
    "ApproximateVerifyWarning",
    "ArtifactError",
    "ArtifactFileError",
    "CooccurrenceFileError",
    "CooccurrenceMask",
    "DynaMoRuntime",
    "DynaMoRuntimeError",
    "GenerationResult",
    "GenerationStats",
    "GenerationTimeout",
    "GraphError",
    "InferenceError",
    "InputError",
    "ManifestError",
    "ProviderError",
    "SamplingConfig",
    "SamplingConfigError",
    "SignatureError",
]
