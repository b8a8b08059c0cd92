"""The artifact manifest: the one description the exporter writes and the runtime reads.

`DIR/manifest.json` names every file of an exported artifact with its size and
sha256, the graph's I/O contract (names, dtypes, named axes, cache-name
patterns), the model's shape, and the sampling defaults. The runtime finds
everything through it, so it is parsed strictly: unknown keys, wrong types and
missing fields are rejected, paths must be plain relative paths inside the
artifact, and links are refused. Artifacts may come from strangers.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, get_type_hints

from runtime.contract import (
    FLOAT_DTYPES,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    TENSOR_DTYPES,
    WEIGHT_DTYPES,
    TensorSpec,
    cache_layer_count,
    cache_names,
)
from runtime.errors import ArtifactError, ArtifactFileError, ManifestError
from runtime.fingerprint import is_fingerprint

MANIFEST_NAME = "manifest.json"
# The artifact's signature (runtime/signing.py): written after the manifest and over every file,
# the manifest included, so it is the one file at the root that the manifest does not list.
SIGNATURE_NAME = "model.sig"
FORMAT_NAME = "dynamo-export-artifact"
# 2: the graph takes logits_to_keep (runtime/contract.py). 1: it returns logits at every fed
# position; still loaded, the session slicing them on the CPU.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SIZE = 2**31 - 1  # any model size or axis; keeps products of a few of them inside int64


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # "dynamo_neox" or "gpt_neox" (exported as one head)
    num_token_heads: int
    num_hidden_layers: int  # the base model's L (stem + head 1's layer)
    num_cache_layers: int  # L + n - 1
    num_attention_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int  # rows of embed_out (the graph's logits width)
    context_length: int
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None


@dataclass(frozen=True)
class GraphInfo:
    file: str
    external_data: str | None
    dtype: str  # fp32 | fp16 | int8 | int4: how the weights are stored
    cache_dtype: str  # float32 | float16: the dtype of past/present tensors
    logits_dtype: str
    opset: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    past_key: str = PAST_KEY
    past_value: str = PAST_VALUE
    present_key: str = PRESENT_KEY
    present_value: str = PRESENT_VALUE


@dataclass(frozen=True)
class Manifest:
    format: str
    schema_version: int
    model: ModelInfo
    graph: GraphInfo
    tokenizer: str | None
    cooccurrence: str | None  # a directory inside the artifact
    sampling_defaults: dict[str, Any]
    producer: dict[str, str]
    verification: dict[str, Any]
    files: dict[str, FileEntry] = field(default_factory=dict)
    # runtime/fingerprint.py; optional: artifacts exported before it have none (unknown, accepted)
    tokenizer_fingerprint: str | None = None

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["tokenizer_fingerprint"] is None:  # an older manifest writes back byte for byte
            del raw["tokenizer_fingerprint"]
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    def cache_names(self, kind: str) -> list[str]:
        """Names of the cache tensors in layer order; kind in past_key/past_value/present_key/present_value."""
        return cache_names(getattr(self.graph, kind), self.model.num_cache_layers)


def _parse(cls, raw: Any, where: str):
    """Build dataclass `cls` from `raw`, rejecting unknown/missing keys and wrong types."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ManifestError(f"{where} has unknown keys {unknown}; allowed: {sorted(names)}")
    required = {f.name for f in fields(cls) if _no_default(f)}
    missing = sorted(required - set(raw))
    if missing:
        raise ManifestError(f"{where} is missing required keys {missing}")
    values = {name: _coerce(hints[name], raw[name], f"{where}.{name}") for name in raw}
    return cls(**values)


def _no_default(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _coerce(hint, value, where: str):
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if hint in (ModelInfo, GraphInfo, TensorSpec, FileEntry):
        return _parse(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} must be an object")
        _, value_type = args
        return {str(k): _coerce(value_type, v, f"{where}[{k!r}]") for k, v in value.items()}
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(inner, value, where)
    if hint is Any:
        return value
    if hint is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where} must be a list")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ManifestError(f"{where} must be a string, got {value!r}")
        return value
    raise ManifestError(f"{where}: unsupported manifest type {hint}")


def parse_manifest(text: str) -> Manifest:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also integers past Python's digit limit, deep nesting
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    manifest = _parse(Manifest, raw, MANIFEST_NAME)
    if manifest.format != FORMAT_NAME:
        raise ManifestError(f"{MANIFEST_NAME}: format must be {FORMAT_NAME!r}, got {manifest.format!r}")
    if manifest.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{MANIFEST_NAME}: schema_version {manifest.schema_version} is not supported by this runtime "
            f"(supports {list(SUPPORTED_SCHEMA_VERSIONS)}); re-export the model or upgrade dynamo-export"
        )
    _check_consistency(manifest)
    return manifest


def _check_consistency(m: Manifest) -> None:
    model = m.model
    if model.num_token_heads < 1 or model.num_cache_layers != cache_layer_count(
        model.num_hidden_layers, model.num_token_heads
    ):
        raise ManifestError(
            f"model: num_cache_layers {model.num_cache_layers} != num_hidden_layers {model.num_hidden_layers} "
            f"+ num_token_heads {model.num_token_heads} - 1"
        )
    sizes = (
        model.vocab_size,
        model.context_length,
        model.num_attention_heads,
        model.head_dim,
        model.hidden_size,
        model.num_hidden_layers,
        model.num_cache_layers,
    )
    if min(sizes) < 1 or max(sizes) > MAX_SIZE:
        raise ManifestError(f"model: sizes must be integers in [1, {MAX_SIZE}]")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        token = getattr(model, name)
        if token is not None and not 0 <= token < model.vocab_size:
            raise ManifestError(f"model.{name}={token} lies outside the vocabulary [0, {model.vocab_size})")
    _check_dtypes(m.graph)
    patterns = [m.graph.past_key, m.graph.past_value, m.graph.present_key, m.graph.present_value]
    one_index = all(p.count("{") == p.count("}") == 1 and "{i}" in p for p in patterns)
    if len(set(patterns)) != 4 or not one_index:
        raise ManifestError(
            f"graph cache name patterns {patterns} must be 4 distinct names, each with one '{{i}}'"
        )
    paths = [m.graph.file] + [p for p in (m.graph.external_data, m.tokenizer) if p]
    for path in paths:
        check_relative_path(path)
        if path not in m.files:
            raise ManifestError(f"{path} is referenced by the manifest but has no entry in 'files'")
    if m.cooccurrence is not None:
        check_relative_path(m.cooccurrence)
    if m.tokenizer_fingerprint is not None and not is_fingerprint(m.tokenizer_fingerprint):
        raise ManifestError("tokenizer_fingerprint must be 64 lowercase hex digits")
    for path, entry in m.files.items():
        check_relative_path(path)
        if (
            entry.size < 0
            or len(entry.sha256) != 64
            or any(c not in "0123456789abcdef" for c in entry.sha256)
        ):
            raise ManifestError(f"files[{path!r}]: size must be >= 0 and sha256 64 lowercase hex digits")


def _check_dtypes(graph: GraphInfo) -> None:
    for where, value, allowed in (
        ("graph.dtype", graph.dtype, WEIGHT_DTYPES),
        ("graph.cache_dtype", graph.cache_dtype, FLOAT_DTYPES),
        ("graph.logits_dtype", graph.logits_dtype, FLOAT_DTYPES),
    ):
        if value not in allowed:
            raise ManifestError(f"{where}={value!r} is not one of {list(allowed)}")
    for kind, specs in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        for name, spec in specs.items():
            if spec.dtype not in TENSOR_DTYPES:
                raise ManifestError(
                    f"graph.{kind}[{name!r}].dtype={spec.dtype!r} is not one of {list(TENSOR_DTYPES)}"
                )
            if not all(_is_axis(axis) for axis in spec.axes):
                raise ManifestError(
                    f"graph.{kind}[{name!r}].axes={spec.axes!r}: each axis is a name or a size >= 0"
                )


def _is_axis(axis: Any) -> bool:
    return (isinstance(axis, str) and axis != "") or (type(axis) is int and 0 <= axis <= MAX_SIZE)


def check_relative_path(path: str) -> PurePosixPath:
    """Accept only plain relative POSIX paths that stay inside the artifact."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        raise ManifestError(f"path {path!r} must be a non-empty relative POSIX path")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or path.startswith("/"):
        raise ManifestError(f"path {path!r} must be relative and stay inside the artifact (no '..', no '/')")
    if "_ORT_MEM_ADDR_" in path:
        raise ManifestError(f"path {path!r} uses ONNX Runtime's in-memory address marker")
    return pure


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(size=path.stat().st_size, sha256=sha256_of(path))


def walk(root: Path) -> Iterator[Path]:
    """Every entry under `root`, links listed but not followed, without recursion: a tree nested
    thousands deep (an artifact from a stranger) must not exhaust Python's stack, as rglob's does."""
    folders = [root]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                yield path
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)


def inventory(root: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under root except the manifest itself."""
    entries = {}
    for path in sorted(walk(root)):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.name != MANIFEST_NAME and rel != SIGNATURE_NAME:
            entries[rel] = file_entry(path)
    return entries


def read_manifest(root: str | os.PathLike) -> Manifest:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory: pass the folder dynamo-export wrote")
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not a dynamo-export artifact (export one first)"
        )
    if path.is_symlink():
        raise ArtifactFileError(f"{path} is a symbolic link; artifacts may not contain links")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text: {exc}") from exc
    return parse_manifest(text)


def verify_files(root: str | os.PathLike, manifest: Manifest, check_hashes: bool = True) -> None:
    """Fail closed unless the artifact holds exactly the listed files with their sizes and hashes."""
    root = Path(root).resolve()
    on_disk = set()
    for path in walk(root):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ArtifactFileError(f"{rel} is a symbolic link; artifacts may not contain links")
        if path.is_file() and path.name != MANIFEST_NAME and rel != SIGNATURE_NAME:
            on_disk.add(rel)
    missing = sorted(set(manifest.files) - on_disk)
    extra = sorted(on_disk - set(manifest.files))
    if missing:
        raise ArtifactFileError(f"files listed in the manifest are missing: {missing}")
    if extra:
        raise ArtifactFileError(
            f"files not listed in the manifest are present: {extra}; remove them or re-export"
        )
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactFileError(f"{rel} is not a regular file")
        if info.st_nlink > 1:
            raise ArtifactFileError(f"{rel} has {info.st_nlink} hard links; artifacts may not contain links")
        if info.st_size != entry.size:
            raise ArtifactFileError(
                f"{rel} is {info.st_size} bytes, the manifest says {entry.size}: truncated or replaced"
            )
        if check_hashes and sha256_of(path) != entry.sha256:
            raise ArtifactFileError(
                f"{rel} does not match its sha256 in the manifest: the file was modified or corrupted"
            )
