"""dynamo-train: modified-CLM training of a DynaMo model, or a GPT-NeoX base from scratch (n = 1).

Examples:
  dynamo-train --train data/train.bin --val data/val.bin --out out/t3 --model base/ --num-token-heads 3
  dynamo-train --train data/train.bin --val data/val.bin --out out/base --layers 6 --hidden 256 --heads 8 \\
      --lr-b 1e-3 --steps 5000
  torchrun --nproc_per_node=4 -m dynamo_export.cli.train ... --batch-size 32   # 4 processes, global batch 32
  torchrun --nproc_per_node=8 -m dynamo_export.cli.train ... --fsdp   # weights + optimizer sharded over 8
Rerun the same command with --resume to continue from the latest OUT/checkpoints/step-N (under any
number of processes, with or without --fsdp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dynamo_export.errors import DynaMoError
from dynamo_export.training import TrainConfig, train
from runtime.errors import DynaMoRuntimeError
from runtime.help_format import HelpFormatter

# Size flags -> GPTNeoXConfig fields, for a fresh base without an --init-config file.
SIZE_FLAGS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "vocab": "vocab_size",
    "context": "max_position_embeddings",
    "intermediate": "intermediate_size",
    "rotary_pct": "rotary_pct",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--train", required=True, help="training token file (NAME.bin + NAME.json)")
    p.add_argument("--val", required=True, help="held-out token file for validation")
    p.add_argument(
        "--out",
        required=True,
        help="output directory: final/ (+ final-gpt-neox/ for n = 1), checkpoints/step-N/, train_log.jsonl, "
        "loss.png",
    )
    src = p.add_argument_group("starting model (one of)")
    src.add_argument("--model", help="GPT-NeoX checkpoint (converted) or DynaMo checkpoint (loaded)")
    src.add_argument("--init-config", help="JSON of GPT-NeoX config fields for a fresh random base")
    sizes = p.add_argument_group("fresh base by flags (instead of --init-config)")
    sizes.add_argument("--layers", type=int, help="transformer layers of the fresh base")
    sizes.add_argument("--hidden", type=int, help="hidden size (a multiple of --heads)")
    sizes.add_argument("--heads", type=int, help="attention heads")
    sizes.add_argument("--vocab", type=int, help="embedding rows (default: the training file's vocab_size)")
    sizes.add_argument("--context", type=int, help="max positions (default 2048)")
    sizes.add_argument("--intermediate", type=int, help="MLP width (default 4 x hidden)")
    sizes.add_argument("--rotary-pct", type=float, help="fraction of each head under rotary (default 0.25)")
    p.add_argument("--num-token-heads", type=int, help="n (default: 3 when converting, 1 for a fresh base)")
    p.add_argument(
        "--head-init",
        choices=["random", "copy"],
        default="random",
        help="new heads 2..n: random layers, or copies of head 1's last layer",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json (or its directory) to carry into the output; must be the "
        "tokenizer of --train/--val and of --model (checked by fingerprint)",
    )
    d = TrainConfig("", "", "")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training window")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="windows per micro-batch, all processes together (the global batch)",
    )
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of the whole run")
    p.add_argument(
        "--lr-b",
        type=float,
        default=d.lr_b,
        help="rate at which head 1's loss moves the base weights (embed_in, stem, head 1, embed_out)",
    )
    p.add_argument("--lr-m", type=float, default=d.lr_m, help="rate of heads 2..n's own weights")
    p.add_argument(
        "--lr-mb",
        type=float,
        default=d.lr_mb,
        help="rate at which heads 2..n's loss moves the shared base weights (embed_in, stem, embed_out); "
        "each source has its own AdamW state there. 0: heads 2..n leave the base weights alone",
    )
    p.add_argument(
        "--warmup-frac",
        type=float,
        default=d.warmup_frac,
        help="share of --steps with linear LR warm-up (then cosine to 0)",
    )
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of matrices and embeddings"
    )
    p.add_argument("--clip", type=float, default=d.clip, help="max gradient norm (0: off)")
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between validations (printed per head)"
    )
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches of --val per validation")
    p.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help="steps between OUT/checkpoints/step-N (resumable)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the model's init and the data order")
    p.add_argument(
        "--distill",
        type=float,
        default=d.distill,
        metavar="W",
        help="self-distillation weight in [0, 1]: heads 2..n train on (1-W)*CE + W*KL(p_1 || p_i), p_1 being "
        "head 1's (detached) distribution for the same token; the KL moves only heads 2..n's own weights. "
        "Drafts that agree with head 1 are accepted more often by verify. 0 (default): plain modified CLM",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=d.distill_temperature,
        metavar="T",
        help="temperature of both distributions in the KL (default 1.0). The runtime samples at 0.7, so T = 0.7 "
        "matches the heads where drafting and verification actually compare them",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (resume later)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the weights, gradients and both AdamW states over the processes (FSDP2) instead of "
        "holding them whole on each: for models that do not fit one device. Same results; checkpoints stay "
        "full, so --resume works with or without it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _init_config(args, parser) -> dict | None:
    flags = {flag: getattr(args, flag) for flag in SIZE_FLAGS if getattr(args, flag) is not None}
    if args.init_config and flags:
        parser.error(
            f"--init-config and size flags ({', '.join('--' + f for f in flags)}) exclude each other"
        )
    if args.init_config:
        try:
            return json.loads(Path(args.init_config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"--init-config {args.init_config}: cannot read JSON ({exc})")
    if flags:
        missing = [f"--{f}" for f in ("layers", "hidden", "heads") if f not in flags]
        if missing:
            parser.error(f"a fresh base needs {', '.join(missing)} as well")
        return {SIZE_FLAGS[f]: v for f, v in flags.items()}
    return None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    init_config = _init_config(args, parser)
    if (args.model is None) == (init_config is None):
        parser.error(
            "give exactly one of --model, --init-config, or the size flags --layers/--hidden/--heads"
        )
    cfg = TrainConfig(
        train=args.train,
        val=args.val,
        out=args.out,
        model=args.model,
        init_config=init_config,
        num_token_heads=args.num_token_heads,
        head_init=args.head_init,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        steps=args.steps,
        lr_b=args.lr_b,
        lr_m=args.lr_m,
        lr_mb=args.lr_mb,
        warmup_frac=args.warmup_frac,
        weight_decay=args.weight_decay,
        clip=args.clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        seed=args.seed,
        distill=args.distill,
        distill_temperature=args.distill_temperature,
    )
    try:
        result = train(
            cfg,
            resume=args.resume,
            stop_at=args.stop_at,
            device=args.device,
            progress=not args.no_progress,
            fsdp=args.fsdp,
        )
    except (DynaMoError, DynaMoRuntimeError) as exc:  # a tokenizer mismatch is the runtime's error
        sys.exit(f"dynamo-train: error: {exc}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"wrote {result}")


if __name__ == "__main__":
    main()
