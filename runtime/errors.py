"""The runtime's exception hierarchy: catch `DynaMoRuntimeError` for anything raised on purpose."""


class DynaMoRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ArtifactError(DynaMoRuntimeError):
    """An exported artifact is missing, malformed, or fails its checks."""


class ManifestError(ArtifactError):
    """manifest.json breaks the schema (unknown/missing keys, wrong types, unsafe paths)."""


class ArtifactFileError(ArtifactError):
    """A file of the artifact is missing, extra, a link, truncated, or fails its hash."""


class GraphError(ArtifactError):
    """model.onnx is malformed, reads data from outside the artifact, or uses what the exporter never emits."""


class SignatureError(ArtifactError):
    """The artifact's signature is missing, invalid, by another key, or does not cover its files as read
    (runtime/signing.py); or signing failed."""


class CooccurrenceFileError(DynaMoRuntimeError):
    """A co-occurrence directory is missing, corrupt, or does not match the model; or cannot be written."""


class InputError(DynaMoRuntimeError):
    """A caller passed token ids or arrays the runtime cannot use (wrong shape, dtype or range)."""


class SamplingConfigError(DynaMoRuntimeError, ValueError):
    """A SamplingConfig option is out of range or conflicts with another; the message names them."""


class SamplingError(DynaMoRuntimeError):
    """The sampler got logits or co-occurrence weights it cannot sample from (non-finite, wrong shape)."""


class ProviderError(DynaMoRuntimeError):
    """The requested ONNX Runtime execution provider is not available in this install."""


class InferenceError(DynaMoRuntimeError):
    """ONNX Runtime failed while running a forward pass (out of memory, a kernel error)."""


class GenerationTimeout(DynaMoRuntimeError):
    """A generate() call ran past its time limit; the forward pass in flight was terminated."""


class TokenizerMismatchError(DynaMoRuntimeError):
    """Two inputs of one command were made with different tokenizers (runtime/fingerprint.py)."""


class ApproximateVerifyWarning(UserWarning):
    """verify runs on a graph whose logits at a position depend on the other positions fed with it
    (int8: dynamic quantization scales activations per tensor), so it only approximates `ar`."""
