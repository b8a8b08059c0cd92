"""tokenizer.json from a stranger: an allow-list of what it may hold, checked before `tokenizers` reads it.

The `tokenizers` library trusts its file: a normalizer that expands text can allocate
gigabytes and abort the process, a corrupt `Precompiled` charsmap or a backtracking `Split`
regex panic in Rust (pyo3's PanicException is a BaseException: it escapes `except
Exception`), truncation and padding silently change the prompt, BPE dropout makes a seed give
different tokens, and a decoder can turn 64 tokens into megabytes of text. So the runtime
parses the JSON itself first and admits only the components the exporter writes and the
GPT-NeoX / Pythia tokenizers use, each with bounded parameters:

- model: BPE (no dropout), WordLevel or WordPiece;
- normalizer: Unicode normal forms, Lowercase, Strip, StripAccents, Prepend and Replace of
  short literal strings, Sequence of these;
- pre-tokenizer: ByteLevel, Whitespace, WhitespaceSplit, BertPreTokenizer, Punctuation,
  Digits, Metaspace, Split on a literal string, Sequence of these (no regexes);
- post-processor: ByteLevel only (one that adds tokens would change the prompt);
- decoder: ByteLevel, Metaspace, WordPiece, BPEDecoder, Fuse, ByteFallback, Strip and Replace
  of short literal strings, Sequence of these;
- no truncation, no padding; at most MAX_ADDED added tokens of at most MAX_LITERAL x 16 chars.

Anything else is refused with the component named. Whatever `tokenizers` raises, panics
included, comes out as the runtime's typed errors (`call`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tokenizers import Tokenizer

from runtime.errors import ArtifactError, DynaMoRuntimeError

MAX_FILE_BYTES = 64 << 20  # Pythia's tokenizer.json is 2 MB
MAX_LITERAL = 16  # characters in a Prepend / Replace / Strip / Split literal
MAX_ADDED = 4096
MAX_NESTING = 4  # Sequence within Sequence

_NORMALIZERS = {
    "NFC",
    "NFD",
    "NFKC",
    "NFKD",
    "Lowercase",
    "Strip",
    "StripAccents",
    "Prepend",
    "Replace",
    "Sequence",
}
_PRE_TOKENIZERS = {
    "ByteLevel",
    "Whitespace",
    "WhitespaceSplit",
    "BertPreTokenizer",
    "Punctuation",
    "Digits",
    "Metaspace",
    "Split",
    "Sequence",
}
_POST_PROCESSORS = {"ByteLevel"}
_DECODERS = {
    "ByteLevel",
    "Metaspace",
    "WordPiece",
    "BPEDecoder",
    "Fuse",
    "ByteFallback",
    "Strip",
    "Replace",
    "Sequence",
}
_MODELS = {"BPE", "WordLevel", "WordPiece"}
_KEYS = {
    "version",
    "truncation",
    "padding",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
}

T = TypeVar("T")


class TokenizerError(ArtifactError):
    """tokenizer.json holds what the runtime does not run, or `tokenizers` failed on it."""


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer at `path`, after the allow-list (module docstring) admitted it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TokenizerError(
            f"{path.name} is {size:,} bytes, over the {MAX_FILE_BYTES:,} a tokenizer may take"
        )
    return parse_tokenizer(path.read_bytes(), path.name)


def parse_tokenizer(data: bytes, name: str) -> Tokenizer:
    """The tokenizer whose tokenizer.json bytes are `data`, after the allow-list admitted them.

    The loader reads the file once and hands these bytes on (runtime/artifact_files.py): the
    allow-list and `tokenizers` judge the same text.
    """
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerError(
            f"{name} is {len(data):,} bytes, over the {MAX_FILE_BYTES:,} a tokenizer may take"
        )
    try:
        text = data.decode("utf-8", errors="strict")
        spec = json.loads(text)
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{name} is not UTF-8 text: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, digit limits, deep nesting
        raise TokenizerError(f"{name} is not valid JSON: {exc}") from exc
    problems = policy_problems(spec)
    if problems:
        raise TokenizerError(
            f"{name} holds what the runtime does not run: {'; '.join(problems)}. The exporter writes "
            "tokenizers that pass; re-export the model, or use a GPT-NeoX/Pythia tokenizer"
        )
    return call(lambda: Tokenizer.from_str(text), f"{name} could not be read", TokenizerError)


def call(action: Callable[[], T], what: str, error: type[DynaMoRuntimeError]) -> T:
    """`action()`, with whatever `tokenizers` raises, a Rust panic included, as `error`."""
    try:
        return action()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # pyo3's PanicException derives from BaseException
        raise error(f"{what}: {type(exc).__name__}: {str(exc)[:200]}") from exc


def policy_problems(spec: object) -> list[str]:
    """Every way the parsed tokenizer.json breaks the allow-list, each naming the component."""
    if not isinstance(spec, dict):
        return ["the file is not a JSON object"]
    problems = [f"unknown top-level key {key!r}" for key in sorted(set(spec) - _KEYS)]
    for setting in ("truncation", "padding"):
        if spec.get(setting) is not None:
            problems.append(f"{setting} is set (it would change the prompt silently): set it to null")
    problems += _model_problems(spec.get("model"))
    problems += _added_problems(spec.get("added_tokens", []))
    for key, allowed in (
        ("normalizer", _NORMALIZERS),
        ("pre_tokenizer", _PRE_TOKENIZERS),
        ("post_processor", _POST_PROCESSORS),
        ("decoder", _DECODERS),
    ):
        problems += _component_problems(key, spec.get(key), allowed, 0)
    return problems


def _model_problems(model: object) -> list[str]:
    if not isinstance(model, dict) or model.get("type") not in _MODELS:
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        return [f"model {kind!r} is not one of {sorted(_MODELS)}"]
    if model.get("dropout") not in (None, 0, 0.0):
        return [f"BPE dropout {model['dropout']!r} makes tokens random: set it to null"]
    return []


def _added_problems(added: object) -> list[str]:
    if not isinstance(added, list):
        return ["added_tokens is not a list"]
    if len(added) > MAX_ADDED:
        return [f"{len(added)} added tokens, over {MAX_ADDED}"]
    long = [t for t in added if not isinstance(t, dict) or len(str(t.get("content", ""))) > MAX_LITERAL * 16]
    return [f"{len(long)} added tokens are malformed or over {MAX_LITERAL * 16} characters"] if long else []


def _component_problems(key: str, part: object, allowed: set[str], depth: int) -> list[str]:
    if part is None:
        return []
    if not isinstance(part, dict) or part.get("type") not in allowed:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        return [f"{key} {kind!r} is not one of {sorted(allowed)}"]
    kind = part["type"]
    if kind == "Sequence":
        if depth >= MAX_NESTING:
            return [f"{key} Sequences nest deeper than {MAX_NESTING}"]
        members = part.get("normalizers") or part.get("pretokenizers") or part.get("decoders") or []
        if not isinstance(members, list):
            return [f"{key} Sequence holds no list"]
        return [p for member in members for p in _component_problems(key, member, allowed, depth + 1)]
    return _literal_problems(key, part)


def _literal_problems(key: str, part: dict) -> list[str]:
    """Literals of Prepend / Replace / Strip / Split must be short strings; patterns never regexes."""
    problems = []
    pattern = part.get("pattern")
    if pattern is not None:
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        if not isinstance(literal, str) or not 0 < len(literal) <= MAX_LITERAL:
            problems.append(
                f"{key} {part['type']} pattern must be a literal string of 1..{MAX_LITERAL} characters"
            )
    for field in ("content", "prepend"):
        value = part.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_LITERAL):
            problems.append(f"{key} {part['type']} {field} must be at most {MAX_LITERAL} characters")
    for field in ("start", "stop", "left", "right"):
        value = part.get(field)
        if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LITERAL):
            problems.append(f"{key} {part['type']} {field} must be an integer in 0..{MAX_LITERAL}")
    return problems
