"""The runtime's exception hierarchy: catch `DynaMoRuntimeError` for anything raised on purpose."""


class DynaMoRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ArtifactError(DynaMoRuntimeError):
    """An exported artifact is missing, malformed, or fails its checks."""


class ManifestError(ArtifactError):
    """manifest.json breaks the schema (unknown/missing keys, wrong types, unsafe paths)."""


class ArtifactFileError(ArtifactError):
    """A file of the artifact is missing, extra, a link, truncated, or fails its hash."""
