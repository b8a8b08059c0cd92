"""The token file: the one on-disk format every tool in the package reads.

`NAME.bin` holds token ids as raw little-endian uint16 (vocab <= 65,536) or
uint32; documents are separated by the end-of-text id. `NAME.json` beside it
holds `dtype`, `vocab_size`, `num_tokens`, `eot_id` and, when the tokenizer is
known, `tokenizer_fingerprint` (runtime/fingerprint.py; files from before it have
none and count as "unknown"). Readers memory-map the
ids so that corpora far larger than RAM stream through counting and training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynamo_export.errors import TokenFileError
from runtime.atomic import atomic_write_bytes, atomic_write_json
from runtime.fingerprint import is_fingerprint

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


@dataclass(frozen=True)
class TokenFileMeta:
    dtype: str
    vocab_size: int
    num_tokens: int
    eot_id: int
    tokenizer_fingerprint: str | None = None


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest id dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 65_536 else "uint32"


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".bin", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".bin"), base.with_suffix(".json")


def write_token_file(
    path: str | os.PathLike,
    ids: np.ndarray,
    vocab_size: int,
    eot_id: int,
    tokenizer_fingerprint: str | None = None,
) -> TokenFileMeta:
    """Write `ids` atomically (temp file + rename) as `path.bin` + `path.json`."""
    bin_path, json_path = _paths(path)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise TokenFileError(f"token ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise TokenFileError(f"token ids must lie in [0, {vocab_size}); got range [{ids.min()}, {ids.max()}]")
    if not 0 <= eot_id < vocab_size:
        raise TokenFileError(f"eot_id {eot_id} is outside the vocabulary of size {vocab_size}")
    if tokenizer_fingerprint is not None and not is_fingerprint(tokenizer_fingerprint):
        raise TokenFileError(f"tokenizer_fingerprint must be 64 hex digits, got {tokenizer_fingerprint!r}")
    dtype = dtype_for_vocab(vocab_size)
    meta = TokenFileMeta(
        dtype=dtype,
        vocab_size=int(vocab_size),
        num_tokens=int(ids.size),
        eot_id=int(eot_id),
        tokenizer_fingerprint=tokenizer_fingerprint,
    )
    header = {k: v for k, v in asdict(meta).items() if v is not None}
    atomic_write_bytes(bin_path, ids.astype(_DTYPES[dtype]).tobytes())
    atomic_write_json(json_path, header)
    return meta


def read_token_meta(path: str | os.PathLike) -> TokenFileMeta:
    bin_path, json_path = _paths(path)
    if not json_path.is_file():
        raise TokenFileError(
            f"{json_path} not found: a token file is NAME.bin + NAME.json (make one with dynamo-data)"
        )
    try:
        text = json_path.read_bytes()
    except OSError as exc:
        raise TokenFileError(f"{json_path} cannot be read as a token-file header: {exc}") from exc
    meta = parse_token_header(text, json_path)
    if not bin_path.is_file():
        raise TokenFileError(f"{bin_path} not found next to {json_path}")
    check_token_bytes(meta, bin_path.stat().st_size, bin_path)
    return meta


def parse_token_header(text: bytes | str, where: str | os.PathLike) -> TokenFileMeta:
    """A token file's JSON header, checked; `where` names it in errors (a path or a URL)."""
    try:
        raw = json.loads(text)
        meta = TokenFileMeta(
            dtype=str(raw["dtype"]),
            vocab_size=int(raw["vocab_size"]),
            num_tokens=int(raw["num_tokens"]),
            eot_id=int(raw["eot_id"]),
            tokenizer_fingerprint=raw.get("tokenizer_fingerprint"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenFileError(f"{where} is not a valid token-file header: {exc}") from exc
    if meta.dtype not in _DTYPES:
        raise TokenFileError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {meta.dtype!r}")
    if meta.tokenizer_fingerprint is not None and not is_fingerprint(meta.tokenizer_fingerprint):
        raise TokenFileError(
            f"{where}: tokenizer_fingerprint must be 64 hex digits; re-tokenize with dynamo-data tokenize"
        )
    return meta


def check_token_bytes(meta: TokenFileMeta, size: int, where: str | os.PathLike) -> None:
    """The .bin's size must be what its header declares."""
    expected = meta.num_tokens * _DTYPES[meta.dtype].itemsize
    if size != expected:
        raise TokenFileError(
            f"{where} holds {size} bytes but its header declares {meta.num_tokens} {meta.dtype} tokens "
            f"({expected} bytes): the file is truncated or does not belong to this header"
        )


def open_tokens(path: str | os.PathLike) -> tuple[np.memmap, TokenFileMeta]:
    """Memory-map a token file read-only; returns (ids, meta)."""
    meta = read_token_meta(path)
    bin_path, _ = _paths(path)
    if meta.num_tokens == 0:
        return np.zeros(0, dtype=_DTYPES[meta.dtype]), meta
    ids = np.memmap(bin_path, dtype=_DTYPES[meta.dtype], mode="r", shape=(meta.num_tokens,))
    return ids, meta
