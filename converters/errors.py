"""The export side's typed errors: catch `ExportError` for anything dynamo-export raises on purpose.

They derive from dynamo_export's `DynaMoError`, so a caller of the PyTorch tool chain as
a whole can still catch every error it raises on purpose with one class.
"""

from dynamo_export.errors import DynaMoError


class ExportError(DynaMoError):
    """An ONNX export was misconfigured, produced a graph that breaks the I/O contract, or could not be written."""


class ParityError(ExportError):
    """The exported graph disagrees with the PyTorch model beyond the tolerance of its dtype."""
