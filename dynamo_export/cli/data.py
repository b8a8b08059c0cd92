"""`dynamo-data`: fetch the reference corpus, train a tokenizer, split train/val, tokenize text into a token file.

Each subcommand is a thin layer over one function of dynamo_export.corpus or
dynamo_export.data. Arguments may be read from a file with `@FILE` (one per
line), which keeps long lists of inputs off the command line.
"""

from __future__ import annotations

import argparse
import textwrap

from dynamo_export.corpus import fetch_corpus
from dynamo_export.data import split_corpus, tokenize_files, train_tokenizer
from dynamo_export.errors import DynaMoError
from runtime.help_format import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-data", description=__doc__, fromfile_prefix_chars="@", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        description = textwrap.fill(help[0].upper() + help[1:] + ".", 88)
        return commands.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)

    fetch = add(
        "fetch-corpus",
        "download python3.11-doc (apt-get download + dpkg -x) and split its doc sources by file",
    )
    fetch.add_argument("--out", required=True, help="corpus directory: train/, heldout/, manifest.json")

    train = add("train-tokenizer", "train a byte-level BPE tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True, help="text files, or directories of them")
    train.add_argument("--vocab-size", type=int, required=True, help="entries including <|endoftext|>")
    train.add_argument("--out", required=True, help="tokenizer JSON file to write")

    split = add(
        "split",
        "split a directory of text files (into OUT/train/, OUT/val/) or a token file NAME (into "
        "OUT/train.bin, OUT/val.bin, by documents) deterministically into training and validation parts",
    )
    split.add_argument("--input", required=True, help="directory of text files, or token file NAME")
    split.add_argument("--out", required=True, help="directory to write (appears whole or not at all)")
    split.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of files (or documents) held out for validation",
    )
    split.add_argument(
        "--seed", type=int, default=0, help="the same input and seed always give the same split"
    )
    split.add_argument("--force", action="store_true", help="replace an existing --out directory")

    tok = add("tokenize", "tokenize text files into a token file NAME.bin + NAME.json")
    tok.add_argument("--tokenizer", required=True, help="tokenizer JSON file")
    tok.add_argument("--input", nargs="+", required=True, help="text files, or directories of them (sorted)")
    tok.add_argument("--out", required=True, help="token file name NAME (writes NAME.bin and NAME.json)")
    docs = tok.add_mutually_exclusive_group()
    docs.add_argument("--doc-per-file", action="store_true", help="each file is one document (the default)")
    docs.add_argument(
        "--doc-separator",
        metavar="SEP",
        help="cut each file into documents at every occurrence of SEP (taken literally; in bash "
        "write e.g. $'\\n\\n\\n' for newlines)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch-corpus":
            manifest = fetch_corpus(args.out)
            for split, entries in manifest["splits"].items():
                print(f"{split}: {len(entries)} files, {sum(e['bytes'] for e in entries):,} bytes")
        elif args.command == "train-tokenizer":
            tokenizer = train_tokenizer(args.input, args.vocab_size, args.out)
            print(f"wrote {args.out}: vocab size {tokenizer.get_vocab_size()}")
        elif args.command == "split":
            counts = split_corpus(args.input, args.out, args.val_fraction, args.seed, args.force)
            print(f"wrote {args.out}: {counts['train']} train and {counts['val']} val parts of {args.input}")
        else:
            meta = tokenize_files(args.tokenizer, args.input, args.out, separator=args.doc_separator)
            print(f"wrote {args.out}.bin: {meta.num_tokens:,} {meta.dtype} tokens, eot id {meta.eot_id}")
    except DynaMoError as exc:
        parser.exit(2, f"dynamo-data {args.command}: error: {exc}\n")


if __name__ == "__main__":
    main()
