"""dynamo-eval: PPL_1..PPL_n and PPL_1:n of a DynaMo (or plain GPT-NeoX, n = 1) checkpoint on a token file.

Examples:
  dynamo-eval --model out/t3/final --tokens data/heldout.bin --seq-len 512 --json out/t3/eval.json
  dynamo-eval --model out/t3/final --tokens data/heldout.bin --acceptance --cooccurrence out/cooccurrence
See dynamo_export.evaluation for the windows and the definition of the joint, and
dynamo_export.acceptance for the expected verify-mode acceptance per draft position.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dynamo_export.acceptance import (
    RUNTIME_TEMPERATURE,
    RUNTIME_TOP_K,
    expected_acceptance,
    format_acceptance,
)
from dynamo_export.errors import DynaMoError, TokenFileError
from dynamo_export.evaluation import check_vocab, evaluate, format_table, load_eval_model
from dynamo_export.tokens import open_tokens
from runtime.atomic import atomic_write_json
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="DynaMo or GPT-NeoX checkpoint directory")
    p.add_argument("--tokens", required=True, help="held-out token file (NAME.bin + NAME.json)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context, at most 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="windows scored per forward pass")
    p.add_argument("--max-batches", type=int, help="score only the first N batches of windows")
    acc = p.add_argument_group("expected acceptance of verify-mode drafts (heads 2..n)")
    acc.add_argument(
        "--acceptance",
        action="store_true",
        help="also report alpha_i = mean sum_x min(p_1(x), q_i(x)) per draft position, teacher-forced",
    )
    acc.add_argument(
        "--cooccurrence",
        metavar="DIR",
        help="masks (pairs.npz / triples.npz) to condition the drafts on the true earlier tokens as well",
    )
    acc.add_argument("--temperature", type=float, default=RUNTIME_TEMPERATURE, help="(the runtime's default)")
    acc.add_argument("--top-k", type=int, default=RUNTIME_TOP_K, help="(the runtime's default)")
    p.add_argument("--json", help="write the results here (atomically)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> dict:
    model = load_eval_model(args.model)
    ids, meta = open_tokens(args.tokens)
    check_vocab(meta, model.config, args.tokens, model_source=args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seq_len = args.seq_len or min(model.config.max_position_embeddings, 2048)
    if seq_len > model.config.max_position_embeddings:
        raise TokenFileError(
            f"--seq-len {seq_len} exceeds the model's context of {model.config.max_position_embeddings}"
        )
    result = evaluate(
        model.to(device), ids, seq_len, args.batch_size, args.max_batches, progress=not args.no_progress
    )
    print(format_table(result))
    report = {"model": str(args.model), "tokens": str(args.tokens), **result.to_json()}
    if args.acceptance:
        masks = None
        if args.cooccurrence:
            from runtime.cooccurrence import CooccurrenceMask

            masks = CooccurrenceMask.load(args.cooccurrence)
        accepted = expected_acceptance(
            model,
            ids,
            seq_len,
            args.batch_size,
            masks,
            args.temperature,
            args.top_k,
            args.max_batches,
            progress=not args.no_progress,
        )
        print(format_acceptance(accepted))
        report["acceptance"] = {"cooccurrence": args.cooccurrence, **accepted.to_json()}
    if args.json:
        atomic_write_json(args.json, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.seq_len is not None and args.seq_len < 1) or args.batch_size < 1:
        parser.error("--seq-len and --batch-size must be >= 1")
    if args.cooccurrence and not args.acceptance:
        parser.error("--cooccurrence conditions the --acceptance drafts: add --acceptance")
    if not args.temperature > 0 or args.top_k < 1:
        parser.error(f"--temperature must be > 0 and --top-k >= 1, got {args.temperature} and {args.top_k}")
    try:
        run(args)
    except (DynaMoError, DynaMoRuntimeError) as exc:  # a bad masks directory is the runtime's error
        sys.exit(f"dynamo-eval: error: {exc}")


if __name__ == "__main__":
    main()
