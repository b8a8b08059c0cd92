"""`dynamo-cooccur`: count a token file's adjacent pairs and triples and write the co-occurrence weights W.

A thin layer over dynamo_export.cooccurrence.build_cooccurrence; the runtime loads
the result with runtime.CooccurrenceMask.load(DIR).
"""

from __future__ import annotations

import argparse

from dynamo_export.cooccurrence import DEFAULT_SHARD_TOKENS, build_cooccurrence
from dynamo_export.errors import DynaMoError
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter


def _orders(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,3, got {text!r}"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-cooccur", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--tokens", required=True, help="token file NAME (NAME.bin + NAME.json, from dynamo-data)"
    )
    parser.add_argument(
        "--out", required=True, help="directory to write: pairs.npz, triples.npz, cooccurrence.json"
    )
    parser.add_argument(
        "--orders", type=_orders, default=(2, 3), help="n-gram orders: 2 or 2,3 (default 2,3)"
    )
    parser.add_argument("--min-count", type=int, default=1, help="drop n-grams seen fewer times (default 1)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per map task (~50 bytes each)"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json the token file was made with: refused if it is another one; recorded in the "
        "masks when the token file predates tokenizer fingerprints",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing co-occurrence directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        meta = build_cooccurrence(
            args.tokens,
            args.out,
            orders=args.orders,
            min_count=args.min_count,
            workers=args.workers,
            force=args.force,
            shard_tokens=args.shard_tokens,
            tokenizer=args.tokenizer,
        )
    except (DynaMoError, DynaMoRuntimeError) as exc:
        parser.exit(2, f"dynamo-cooccur: error: {exc}\n")
    nnz = ", ".join(f"{n}-grams {meta.nnz[n]:,}" for n in meta.orders)
    print(f"wrote {args.out}: {meta.num_tokens:,} tokens, vocab {meta.vocab_size}, {nnz}")


if __name__ == "__main__":
    main()
