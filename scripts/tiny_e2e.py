"""Tiny end-to-end run: random tiny GPT-NeoX -> convert (n = 3) -> train on real text -> eval.

    python -m scripts.tiny_e2e [--steps 300] [--threads 1]

The issue's "done when" check: every head's validation loss must fall. Data is
data/reference (the Python 3.11 docs, byte-level BPE with 8,192 ids), built by
scripts.reference_data when missing. Everything is written under
out/tiny_e2e/, which is rebuilt from scratch on each run, so reruns reproduce
the same numbers (fixed seeds, one thread by default):

    base/        the random GPT-NeoX (transformers format, + tokenizer.json)
    converted/   DynaMoForCausalLM.from_gpt_neox(base/, 3 heads, random heads)
    run/         dynamo-train output: final/, checkpoints/, train_log.jsonl
    eval-*.json  dynamo-eval on the held-out file, before and after training

The base is random, not pretrained, so all three learning rates are high
(LR_B = LR_M = 2e-3, LR_MB = 2e-4, keeping the paper's LR_MB/LR_B = 0.1).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.cli.eval import main as eval_main
from dynamo_export.cli.train import main as train_main
from dynamo_export.tokens import read_token_meta

DATA = Path("data/reference")
OUT = Path("out/tiny_e2e")
SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
}
SEQ_LEN = 64


def ensure_data() -> None:
    if not all((DATA / f"{split}.bin").is_file() for split in ("train", "heldout")):
        from scripts.reference_data import build_reference_data

        build_reference_data(DATA)


def make_models(vocab_size: int, eot_id: int) -> None:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab_size, bos_token_id=eot_id, eos_token_id=eot_id, **SIZES)
    GPTNeoXForCausalLM(config).save_pretrained(OUT / "base")
    shutil.copy2(DATA / "tokenizer.json", OUT / "base" / "tokenizer.json")
    torch.manual_seed(1)
    DynaMoForCausalLM.from_gpt_neox(OUT / "base", num_token_heads=3).save_pretrained(OUT / "converted")


def evaluate(model: Path, name: str) -> dict:
    out = OUT / f"eval-{name}.json"
    eval_main(
        [
            "--model",
            str(model),
            "--tokens",
            str(DATA / "heldout.bin"),
            "--seq-len",
            str(SEQ_LEN),
            "--batch-size",
            "32",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machine: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ensure_data()
    meta = read_token_meta(DATA / "train")
    shutil.rmtree(OUT, ignore_errors=True)
    make_models(meta.vocab_size, meta.eot_id)
    print("== before training")
    before = evaluate(OUT / "converted", "before")
    train_main(
        [
            "--train",
            str(DATA / "train.bin"),
            "--val",
            str(DATA / "heldout.bin"),
            "--out",
            str(OUT / "run"),
            "--model",
            str(OUT / "converted"),
            "--seq-len",
            str(SEQ_LEN),
            "--batch-size",
            "16",
            "--steps",
            str(args.steps),
            "--lr-b",
            "2e-3",
            "--lr-m",
            "2e-3",
            "--lr-mb",
            "2e-4",
            "--eval-every",
            "50",
            "--eval-batches",
            "8",
            "--save-every",
            "100",
            "--seed",
            "0",
            "--no-progress",
        ]
    )
    print("== after training")
    after = evaluate(OUT / "run" / "final", "after")

    log = [json.loads(line) for line in (OUT / "run" / "train_log.jsonl").read_text().splitlines()]
    print("\nvalidation loss per head (first 8 x 16 held-out windows of 64 tokens)")
    print(f"{'step':>6} " + " ".join(f"{'head ' + str(i + 1):>8}" for i in range(3)))
    for record in log:
        if "val_loss" in record:
            print(f"{record['step']:>6} " + " ".join(f"{v:8.4f}" for v in record["val_loss"]))
    speeds = sorted(r["tokens_per_s"] for r in log if "tokens_per_s" in r)
    print(f"\ntraining throughput: median {speeds[len(speeds) // 2]:.0f} tokens/s ({args.threads} thread(s))")
    print(f"\nheld-out perplexity ({after['num_positions']} positions per head)")
    print(f"{'metric':>8} {'before':>10} {'after':>10}")
    for key in after["ppl"]:
        print(f"{key:>8} {before['ppl'][key]:10.2f} {after['ppl'][key]:10.2f}")
    first, last = log[0]["val_loss"], log[-1]["val_loss"]
    falling = all(b < a for a, b in zip(first, last, strict=True))
    print(f"\nevery head's validation loss fell: {falling}")
    if not falling:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
