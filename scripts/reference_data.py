"""Build data/reference/: corpus -> tokenizer -> train/heldout token files, resuming finished steps.

    python -m scripts.reference_data [--out data/reference] [--vocab-size 8192]

Each step records a fingerprint of its inputs in `steps.json`; a step whose
fingerprint matches and whose outputs are intact is skipped, and a changed
input (new package version, other vocab size, retrained tokenizer) reruns it
and everything after it.

Vocabulary size 8,192: the reference model is small (width ~256), and its
untied input and output embeddings cost 2 x V x width parameters, so a 16k
vocabulary would double the largest weight matrices and the co-occurrence
masks for a few percent fewer tokens per byte; 4k would make sequences longer
for the same text. Rerun with --vocab-size to compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tokenizers

from dynamo_export.corpus import SPLITS, fetch_corpus, split_files
from dynamo_export.data import tokenize_files, train_tokenizer
from dynamo_export.errors import TokenFileError
from dynamo_export.tokens import read_token_meta
from runtime.atomic import atomic_write_json

DEFAULT_OUT = Path("data/reference")
VOCAB_SIZE = 8192


def build_reference_data(out: Path = DEFAULT_OUT, vocab_size: int = VOCAB_SIZE) -> dict:
    """Run the three steps into `out`; returns per-split file, byte and token counts."""
    steps_path = out / "steps.json"
    steps = json.loads(steps_path.read_text()) if steps_path.is_file() else {}
    corpus_dir, tokenizer_path = out / "corpus", out / "tokenizer.json"

    with _timed("fetch corpus"):
        manifest = fetch_corpus(corpus_dir)
    corpus_digest = _sha256(json.dumps(manifest, sort_keys=True).encode())

    key = {"corpus": corpus_digest, "vocab_size": vocab_size, "tokenizers": tokenizers.__version__}
    if steps.get("tokenizer") == key and tokenizer_path.is_file():
        print(f"{tokenizer_path} is up to date; skipping", flush=True)
    else:
        with _timed(f"train tokenizer (vocab {vocab_size})"):
            train_tokenizer(split_files(corpus_dir, "train"), vocab_size, tokenizer_path)
        steps["tokenizer"] = key
        atomic_write_json(steps_path, steps)

    key = {"corpus": corpus_digest, "tokenizer": _sha256(tokenizer_path.read_bytes())}
    summary = {}
    for split in SPLITS:
        if steps.get(split) == key and _token_file_intact(out / split):
            print(f"{out / split}.bin is up to date; skipping", flush=True)
        else:
            with _timed(f"tokenize {split}"):
                tokenize_files(tokenizer_path, split_files(corpus_dir, split), out / split)
            steps[split] = key
            atomic_write_json(steps_path, steps)
        entries = manifest["splits"][split]
        num_bytes = sum(e["bytes"] for e in entries)
        num_tokens = read_token_meta(out / split).num_tokens
        summary[split] = {
            "files": len(entries),
            "bytes": num_bytes,
            "tokens": num_tokens,
            "bytes_per_token": round(num_bytes / num_tokens, 3),
        }
    return summary


def _token_file_intact(path: Path) -> bool:
    try:
        read_token_meta(path)
    except TokenFileError:
        return False
    return True


@contextmanager
def _timed(label: str) -> Iterator[None]:
    print(f"== {label}", flush=True)
    start = time.perf_counter()
    yield
    print(f"== {label}: {time.perf_counter() - start:.1f} s", flush=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=VOCAB_SIZE, help="tokenizer size (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    summary = build_reference_data(args.out, args.vocab_size)
    print(f"{'split':8} {'files':>6} {'bytes':>12} {'tokens':>11} {'bytes/token':>12}")
    for split, s in summary.items():
        print(f"{split:8} {s['files']:>6} {s['bytes']:>12,} {s['tokens']:>11,} {s['bytes_per_token']:>12.3f}")


if __name__ == "__main__":
    main()
