"""Text -> tokens: train a byte-level BPE tokenizer, split a corpus into train/val, write token files.

The tokenizer is GPT-2's recipe with the `tokenizers` library: a ByteLevel
pre-tokenizer and decoder over all 256 byte symbols, so any Unicode text
round-trips exactly and no input is ever unknown, plus one special token,
`<|endoftext|>` (id 0), which separates documents in token files.

Tokenization streams: files are read one document at a time and encoded in
batches (`encode_batch` runs in parallel in Rust), so memory holds the ids and
one batch of text, never the whole corpus.
"""

from __future__ import annotations

import codecs
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from dynamo_export.errors import DataError
from dynamo_export.tokens import TokenFileMeta, dtype_for_vocab, open_tokens, write_token_file
from runtime.atomic import atomic_directory, atomic_write_text
from runtime.errors import DynaMoRuntimeError
from runtime.fingerprint import tokenizer_fingerprint

EOT_TOKEN = "<|endoftext|>"
_NUM_BYTE_SYMBOLS = 256
_READ_BYTES = 1 << 20  # text is read and split in ~1 MB pieces
_BATCH_CHARS = 1 << 22  # ~4 MB of text per encode_batch call
_BATCH_DOCS = 512


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; a directory stands for every file under it, in sorted path order."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("no input given: pass text files or directories of text files")
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise DataError(f"input not found: {', '.join(missing)}")
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
            if not found:
                raise DataError(f"input directory {path} holds no files")
            files.extend(found)
        else:
            files.append(path)
    return files


def train_tokenizer(
    inputs: Iterable[str | os.PathLike], vocab_size: int, out: str | os.PathLike, show_progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` entries (eot included) and save it to `out`.

    The vocabulary can come out smaller than asked for when the text runs out
    of pairs to merge; `get_vocab_size()` is the truth.
    """
    minimum = _NUM_BYTE_SYMBOLS + 1
    if vocab_size < minimum:
        raise DataError(
            f"vocab_size must be at least {minimum} (256 byte symbols + {EOT_TOKEN}), got {vocab_size}"
        )
    files = expand_inputs(inputs)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_text_pieces(files), trainer=trainer)
    atomic_write_text(out, tokenizer.to_str(pretty=True))
    return tokenizer


def _text_pieces(files: list[Path]) -> Iterator[str]:
    """The files' text in ~1 MB pieces cut at line ends.

    BPE training only counts pre-tokens, and a cut at a line end changes at
    most the one pre-token there, so pieces stand in for whole files.
    """
    for path in files:
        try:
            with open(path, encoding="utf-8", newline="") as f:
                while lines := f.readlines(_READ_BYTES):
                    yield "".join(lines)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def load_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, int]:
    """A saved tokenizer and its end-of-text id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found; train one with `dynamo-data train-tokenizer`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for malformed JSON
        raise DataError(f"{path} is not a tokenizers JSON file: {exc}") from exc
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    if eot_id is None:
        raise DataError(f"tokenizer {path} has no {EOT_TOKEN} token; documents cannot be separated")
    return tokenizer, eot_id


def iter_documents(
    files: list[Path], separator: str | None = None, progress: tqdm | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of `files`, ticking `progress` by the bytes read.

    Without a separator each file is one document; with one, each file is cut
    at every occurrence of it (a document never spans two files). Empty
    documents are skipped, so the token file never holds two eot ids in a row.
    """
    if separator == "":
        raise DataError("the document separator must not be empty")
    for path in files:
        if separator is None:
            data = path.read_bytes()
            if progress is not None:
                progress.update(len(data))
            if doc := _decode(data, path):
                yield doc
        else:
            yield from _split_stream(path, separator, progress)


def _split_stream(path: Path, separator: str, progress: tqdm | None) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            if progress is not None:
                progress.update(len(chunk))
            pending += _decode(chunk, path, decoder)
            *docs, pending = pending.split(separator)
            yield from filter(None, docs)
    if last := pending + _decode(b"", path, decoder, final=True):
        yield last


def _decode(
    data: bytes, path: Path, decoder: codecs.IncrementalDecoder | None = None, final: bool = False
) -> str:
    try:
        return data.decode("utf-8") if decoder is None else decoder.decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def tokenize_files(
    tokenizer_path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    separator: str | None = None,
    show_progress: bool = True,
) -> TokenFileMeta:
    """Tokenize documents from text files into the token file `out` (.bin + .json).

    Documents are joined with the eot id between them. A literal
    "<|endoftext|>" inside a document is encoded as ordinary text, so the
    only eot ids in the file are the separators this function writes.
    """
    tokenizer, eot_id = load_tokenizer(tokenizer_path)
    tokenizer.encode_special_tokens = True
    files = expand_inputs(inputs)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(dtype_for_vocab(vocab_size))
    eot = np.array([eot_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    total = sum(p.stat().st_size for p in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"tokenize {Path(out).name}", disable=not show_progress
    ) as bar:
        for batch in _batches(iter_documents(files, separator, bar)):
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                if pieces:
                    pieces.append(eot)
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
    if not pieces:
        raise DataError(f"the inputs hold no text to tokenize: {', '.join(map(str, files))}")
    try:
        fingerprint = tokenizer_fingerprint(tokenizer_path)
    except DynaMoRuntimeError as exc:
        raise DataError(str(exc)) from exc
    ids = np.concatenate(pieces)
    return write_token_file(out, ids, vocab_size=vocab_size, eot_id=eot_id, tokenizer_fingerprint=fingerprint)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    """Group documents into batches of about `_BATCH_CHARS` characters for encode_batch."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def split_corpus(
    source: str | os.PathLike,
    out: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
) -> dict[str, int]:
    """Split a directory of text files, or a token file, into train and validation parts under `out`.

    A directory's files are the units (written to OUT/train/ and OUT/val/ under their
    relative paths); a token file's documents are (OUT/train.bin/.json, OUT/val.bin/.json,
    keeping the tokenizer fingerprint). Which units go to val is a permutation drawn
    from `seed` over the units in sorted order, so the same input and seed always give
    the same split; each part keeps its units' original order. `out` appears whole or
    not at all (runtime/atomic.py). Returns the number of units in each part.
    """
    source, out = Path(source), Path(out)
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
    if not source.is_dir() and not any(Path(f"{source}{s}").is_file() for s in ("", ".json")):
        raise DataError(
            f"--input {source}: no such directory of text files or token file NAME (.bin + .json)"
        )
    if out.exists() and not force:
        raise DataError(f"{out} already exists: choose another --out or pass --force to replace it")
    with atomic_directory(out, overwrite=force) as staging:
        if source.is_dir():
            return _split_files(source, staging, val_fraction, seed)
        return _split_documents(source, staging, val_fraction, seed)


def _val_units(count: int, val_fraction: float, seed: int, what: str, source: Path) -> np.ndarray:
    """A boolean mask over `count` units: True for the validation part (at least one unit in each part)."""
    if count < 2:
        raise DataError(f"{source} holds {count} {what}; a train/val split needs at least 2")
    k = min(count - 1, max(1, round(val_fraction * count)))
    chosen = np.random.default_rng(seed).permutation(count)[:k]
    mask = np.zeros(count, dtype=bool)
    mask[chosen] = True
    return mask


def _split_files(source: Path, staging: Path, val_fraction: float, seed: int) -> dict[str, int]:
    files = expand_inputs([source])
    in_val = _val_units(len(files), val_fraction, seed, "files", source)
    for path, is_val in zip(files, in_val, strict=True):
        target = staging / ("val" if is_val else "train") / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return {"train": int((~in_val).sum()), "val": int(in_val.sum())}


def _split_documents(source: Path, staging: Path, val_fraction: float, seed: int) -> dict[str, int]:
    ids, meta = open_tokens(source)
    is_eot = np.asarray(ids) == meta.eot_id  # (N,)
    doc_of = np.cumsum(is_eot) - is_eot  # each token's document; an eot belongs to the one it ends
    in_val = _val_units(int(doc_of[-1]) + 1 if len(ids) else 0, val_fraction, seed, "documents", source)
    for name, keep in (("train", ~in_val[doc_of]), ("val", in_val[doc_of])):
        part = np.asarray(ids)[keep]
        if len(part) and part[-1] == meta.eot_id:  # the part's last document ended with a separator
            part = part[:-1]
        write_token_file(staging / name, part, meta.vocab_size, meta.eot_id, meta.tokenizer_fingerprint)
    return {"train": int((~in_val).sum()), "val": int(in_val.sum())}
