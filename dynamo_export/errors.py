"""One exception hierarchy for the PyTorch side, so callers can catch by kind."""


class DynaMoError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(DynaMoError):
    """A path is not a GPT-NeoX/DynaMo checkpoint, or its weights do not match its config."""


class TokenFileError(DynaMoError):
    """A token file (NAME.bin + NAME.json) is missing, malformed or inconsistent."""


class CooccurrenceError(DynaMoError):
    """Co-occurrence counting was asked for something impossible."""


class TrainingError(DynaMoError):
    """A training run was misconfigured or cannot resume."""


class DataError(DynaMoError):
    """Text, a tokenizer or the reference corpus for dynamo-data is missing or unusable."""


class ExportError(DynaMoError):
    """An ONNX export was misconfigured, produced a graph that breaks the I/O contract, or could not be written."""


class ParityError(ExportError):
    """The exported graph disagrees with the PyTorch model beyond the tolerance of its dtype."""


class BenchError(DynaMoError):
    """dynamo-bench was given options, prompts or models it cannot benchmark (the message says which)."""
