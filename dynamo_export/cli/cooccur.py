"""`dynamo-cooccur`: count a token file's adjacent pairs and triples and write the co-occurrence weights W.

A thin layer over dynamo_export.cooccurrence.build_cooccurrence (--engine local, one
machine) and dynamo_export.cooccurrence_spark.build_cooccurrence_spark (--engine spark,
one or many token files, local or on a cluster; pip install "dynamo-export[spark]" and
Java 17+). Both write the same directory; the runtime loads it with
runtime.CooccurrenceMask.load(DIR).
"""

from __future__ import annotations

import argparse

from dynamo_export.cooccurrence import DEFAULT_SHARD_TOKENS, build_cooccurrence
from dynamo_export.cooccurrence_spark import DEFAULT_MASTER, build_cooccurrence_spark
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
        "--tokens",
        required=True,
        nargs="+",
        metavar="NAME",
        help="token file NAME (NAME.bin + NAME.json, from dynamo-data); with --engine spark one or more, each "
        "a path, a glob or a URL fsspec reads (hdfs://, s3://, ...), every file holding whole documents",
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
    parser.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: worker processes on this machine; spark: a Spark job (the spark extra, Java 17+)",
    )
    parser.add_argument(
        "--spark-master",
        help=f"with --engine spark: the master URL, e.g. local[4], yarn, spark://HOST:7077 (default {DEFAULT_MASTER})",
    )
    parser.add_argument(
        "--spark-conf",
        action="append",
        metavar="KEY=VALUE",
        help="with --engine spark: a Spark setting, repeatable (spark.executor.memory=8g, spark.hadoop.fs.*=...)",
    )
    return parser


def _check_engine_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options the chosen engine would ignore, naming them."""
    if args.engine == "local":
        spark_only = [
            o for o, v in (("--spark-master", args.spark_master), ("--spark-conf", args.spark_conf)) if v
        ]
        if spark_only:
            parser.error(f"{' and '.join(spark_only)} need --engine spark")
        if len(args.tokens) > 1:
            parser.error(f"--engine local counts one token file, got {len(args.tokens)}: use --engine spark")
    elif args.workers is not None:
        parser.error(
            "--workers is --engine local's; Spark's parallelism is its master's (--spark-master local[N]) "
            "or the cluster's executors"
        )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_engine_options(parser, args)
    common = dict(
        orders=args.orders,
        min_count=args.min_count,
        force=args.force,
        shard_tokens=args.shard_tokens,
        tokenizer=args.tokenizer,
    )
    try:
        if args.engine == "spark":
            meta = build_cooccurrence_spark(
                args.tokens,
                args.out,
                master=args.spark_master or DEFAULT_MASTER,
                spark_conf=args.spark_conf or [],
                **common,
            )
        else:
            meta = build_cooccurrence(args.tokens[0], args.out, workers=args.workers, **common)
    except (DynaMoError, DynaMoRuntimeError) as exc:
        parser.exit(2, f"dynamo-cooccur: error: {exc}\n")
    nnz = ", ".join(f"{n}-grams {meta.nnz[n]:,}" for n in meta.orders)
    print(f"wrote {args.out}: {meta.num_tokens:,} tokens, vocab {meta.vocab_size}, {nnz}")


if __name__ == "__main__":
    main()
