"""One exception hierarchy for the PyTorch side, so callers can catch by kind.

The export's errors (ExportError, ParityError) are converters/errors.py's and the
benchmark's (BenchError) dynamo_bench/errors.py's; both derive from DynaMoError.
"""


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
