"""Training throughput (tokens/s) of a GPT-NeoX / DynaMo model on this machine's CPU.

    python -m benchmarks.bench_training [--layers 6 --hidden 256 --heads 8 --seq-len 256 --batch-size 8]
        [--steps 20] [--threads 1 2] [--token-heads 1 3] [--lr-mb 1e-4 0]

Runs the trainer's own optimizer step (`dynamo_export.training.train_step`:
forward, modified-CLM loss, one backward per gradient source, clipping, AdamW)
on random windows of the reference training file (data/reference/train.bin,
vocab 8,192), after two warm-up steps, and prints min / median tokens/s per
(threads, heads, LR_MB) setting. LR_MB = 0 and LR_MB > 0 cost differently:
with LR_MB > 0 heads 2..n's loss is backpropagated through the stem as well
(docs/METHOD.md, "Training").

Several processes (dynamo_export/distributed.py) are measured by the trainer
itself: run `torchrun --nproc_per_node=N -m dynamo_export.cli.train ...` with
the same global --batch-size and OMP_NUM_THREADS=1, and read `tokens_per_s`
(global batch, all ranks together) from OUT/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dynamo_export.three_rates import ThreeRateAdamW
from dynamo_export.tokens import open_tokens
from dynamo_export.training import TrainConfig, WindowSampler, build_model, train_step

WARMUP_STEPS = 2


def measure(args, threads: int, token_heads: int, lr_mb: float) -> list[float]:
    torch.set_num_threads(threads)
    ids, meta = open_tokens(args.train)
    sizes = {
        "num_hidden_layers": args.layers,
        "hidden_size": args.hidden,
        "num_attention_heads": args.heads,
        "max_position_embeddings": max(2048, args.seq_len),
    }
    cfg = TrainConfig(
        train=args.train,
        val=args.train,
        out="",
        init_config=sizes,
        num_token_heads=token_heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=WARMUP_STEPS + args.steps,
        lr_b=1e-3,
        lr_m=1e-3,
        lr_mb=lr_mb,
    )
    torch.manual_seed(0)
    model = build_model(cfg, meta.vocab_size, meta.eot_id).train()
    optimizer = ThreeRateAdamW(model, cfg)
    sampler = WindowSampler(ids, cfg.seq_len + token_heads, cfg.batch_size, seed=0)
    speeds = []
    for step in range(cfg.steps):
        began = time.perf_counter()
        train_step(model, optimizer, sampler, step, cfg, torch.device("cpu"))
        if step >= WARMUP_STEPS:
            speeds.append(cfg.batch_size * cfg.seq_len / (time.perf_counter() - began))
    return speeds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="data/reference/train.bin")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--token-heads", type=int, nargs="+", default=[1, 3])
    p.add_argument("--lr-mb", type=float, nargs="+", default=[1e-4, 0.0], help="LR_MB settings (n > 1 only)")
    args = p.parse_args(argv)
    print(
        f"GPT-NeoX {args.layers} layers, width {args.hidden}, {args.heads} attention heads; "
        f"seq {args.seq_len}, batch {args.batch_size}; {args.steps} timed steps"
    )
    print(f"{'threads':>7} {'n':>3} {'lr_mb':>7} {'min tok/s':>10} {'median tok/s':>13}")
    for threads in args.threads:
        for n in args.token_heads:
            for lr_mb in args.lr_mb if n > 1 else args.lr_mb[:1]:  # n = 1 has no LR_MB
                speeds = measure(args, threads, n, lr_mb)
                print(
                    f"{threads:>7} {n:>3} {lr_mb:>7g} {min(speeds):>10.0f} {statistics.median(speeds):>13.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
