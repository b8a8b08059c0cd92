"""Tokenizer fingerprints: which tokenizer a token file, checkpoint, mask set or artifact belongs to.

Two tokenizers of the same vocabulary size pass every size check, yet map the same id to
different text: a model evaluated on, or masks counted from, another tokenizer's ids give
nonsense without an error (issue 20: PPL 2,239, no warning). So every file that holds or
consumes token ids records the fingerprint of its tokenizer, and every command that combines
two of them compares the two with `check_same_tokenizer`.

The fingerprint is the sha256 of the tokenizer's *canonical* content, not of its JSON bytes:
the model type, the vocabulary as (id, token) pairs sorted by id, the merges in order (both of
the `tokenizers` library's spellings, "a b" and ["a", "b"], count as the same), and the added
tokens as (id, content, special) sorted by id. Re-saving, pretty-printing or reordering keys
keeps it; any change to which id means which text changes it.

A file written before fingerprints existed has none: that is "unknown" and always accepted,
so old artifacts, masks and token files stay usable. Torch-free: json and hashlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from runtime.errors import DynaMoRuntimeError, TokenizerMismatchError

TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 64 << 20  # Pythia's tokenizer.json is 2 MB
SHOWN = 12  # hex digits of a fingerprint shown in messages


class FingerprintError(DynaMoRuntimeError):
    """A tokenizer file cannot be fingerprinted (missing, not JSON, no vocabulary)."""


def is_fingerprint(value: Any) -> bool:
    """Whether `value` is a recorded fingerprint: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def fingerprint_of_json(raw: Any, where: str = "tokenizer") -> str:
    """The fingerprint of a parsed tokenizer.json (see the module docstring for what counts)."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise FingerprintError(f"{where} has no model vocabulary: it is not a tokenizers JSON file")
    vocab = model["vocab"]
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece: token -> id
        entries = sorted((int(i), str(t)) for t, i in vocab.items())
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...], the id is the position
        entries = [(i, str(item[0])) for i, item in enumerate(vocab)]
    else:
        raise FingerprintError(f"{where}: model.vocab must be an object or a list")
    merges = [
        m.split(" ", 1) if isinstance(m, str) else [str(p) for p in m] for m in model.get("merges") or []
    ]
    added = sorted(
        (int(t.get("id", -1)), str(t.get("content", "")), bool(t.get("special", False)))
        for t in raw.get("added_tokens") or []
        if isinstance(t, dict)
    )
    canonical = {"type": model.get("type"), "vocab": entries, "merges": merges, "added_tokens": added}
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of a tokenizer.json file (or of a directory's tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FingerprintError(f"tokenizer {path} not found; train one with `dynamo-data train-tokenizer`")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise FingerprintError(
            f"{path} is larger than {MAX_TOKENIZER_BYTES} bytes; it is not a tokenizer.json"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FingerprintError(f"{path} is not valid JSON ({exc})") from exc
    try:
        return fingerprint_of_json(raw, str(path))
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise FingerprintError(f"{path} has a malformed vocabulary, merges or added tokens ({exc})") from exc


def check_same_tokenizer(
    first: str | None, first_source: str, second: str | None, second_source: str, fix: str
) -> None:
    """Refuse to combine two things made with different tokenizers, in one line naming both and the fix.

    None (a file from before fingerprints) is unknown and accepted.
    """
    if first is None or second is None or first == second:
        return
    raise TokenizerMismatchError(
        f"tokenizer mismatch: {first_source} belongs to tokenizer {first[:SHOWN]} but {second_source} to "
        f"tokenizer {second[:SHOWN]} (same vocabulary size or not, their ids mean different text): {fix}"
    )


def check_artifact_masks(root: Path, model_fingerprint: str | None, masks_dir: str, masks_meta) -> None:
    """The runtime's load: the artifact's masks must come from its own tokenizer's token files."""
    check_same_tokenizer(
        model_fingerprint,
        f"artifact {root} (manifest.json)",
        getattr(masks_meta, "tokenizer_fingerprint", None),
        f"its masks {root / masks_dir}",
        "re-export with dynamo-export --cooccurrence DIR, DIR counted by dynamo-cooccur from the model's own "
        "token files",
    )
