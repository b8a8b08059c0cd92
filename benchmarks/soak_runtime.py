"""Soak the runtime: many decode passes with varying prompts, printing resident memory as it goes.

A long-running service must not grow without bound. This runs generate()
calls on one loaded runtime until at least --passes forward passes have run,
cycling the modes (dynamic, verify, ar), with random prompt lengths (1 .. half
the context), random max_new_tokens (1 .. 64), a fresh seed per call, and a
per-call time limit (so every call also starts and cancels a Deadline timer).
Every --every passes it prints the process's resident set size (RSS); the
summary compares the second half of the run with the first. ONNX Runtime's
arena grows while it meets new, larger shapes, so early growth is expected;
what matters is that the curve levels off.

Without --artifact it builds a small random DynaMo-T3 (hidden 64, 4 layers,
vocab 512, context 256) with co-occurrence masks from a random token stream,
exported to a temporary directory (needs torch; about a minute on 2 cores).
The build runs in a child process, so the soaked process is torch-free like a
real deployment and its RSS is the runtime's own.

    python -m benchmarks.soak_runtime [--passes 10000] [--every 500] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from runtime import DynaMoRuntime, SamplingConfig

MODES = ("dynamic", "verify", "ar")


def build_small_artifact(root: Path) -> None:
    """A random small DynaMo-T3 with masks, exported with dynamo-export's own code path."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from converters.artifact import export_artifact
    from dynamo_export import DynaMoForCausalLM
    from dynamo_export.cooccurrence import build_cooccurrence
    from dynamo_export.tokens import write_token_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = 512
    config = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=256,
        rotary_pct=0.25, max_position_embeddings=256, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(root / "base")
    DynaMoForCausalLM.from_gpt_neox(root / "base", num_token_heads=3).save_pretrained(root / "t3")
    # A skewed random stream (Zipf) so that the masks hold frequent pairs and triples, like text does.
    ids = np.minimum(np.random.default_rng(0).zipf(1.3, 200_000), vocab) - 1
    write_token_file(root / "tokens", ids.astype(np.int64), vocab_size=vocab, eot_id=0)
    build_cooccurrence(root / "tokens", root / "cooc", orders=(2, 3), workers=1, progress=False)
    export_artifact(
        root / "t3", out=root / "t3-onnx", cooccurrence=root / "cooc", verify=False, progress=False
    )


def soak(rt: DynaMoRuntime, passes: int, every: int, seed: int) -> list[tuple[int, int, float, float]]:
    """Run calls until `passes` forward passes; returns (passes, calls, RSS MiB, seconds) checkpoints."""
    rng = np.random.default_rng(seed)
    process = psutil.Process()
    context, vocab = rt.manifest.model.context_length, rt.manifest.model.vocab_size
    configs = {mode: SamplingConfig(mode=mode, eps_b=0.3, temperature=1.0) for mode in MODES}
    done, calls, next_mark, start = 0, 0, 0, time.perf_counter()
    curve = []
    while done < passes:
        if done >= next_mark:
            curve.append((done, calls, process.memory_info().rss / 2**20, time.perf_counter() - start))
            print(f"{done:>8} passes  {calls:>6} calls  RSS {curve[-1][2]:8.1f} MiB  {curve[-1][3]:7.1f} s")
            next_mark += every
        prompt = rng.integers(1, vocab, int(rng.integers(1, context // 2))).tolist()
        config = configs[MODES[calls % len(MODES)]]
        max_new = int(rng.integers(1, 65))
        result = rt.generate(prompt, max_new, config, seed=calls, time_limit_s=60.0)
        done += result.stats.forward_passes
        calls += 1
    curve.append((done, calls, process.memory_info().rss / 2**20, time.perf_counter() - start))
    print(f"{done:>8} passes  {calls:>6} calls  RSS {curve[-1][2]:8.1f} MiB  {curve[-1][3]:7.1f} s")
    return curve


def summarize(curve: list[tuple[int, int, float, float]]) -> None:
    half = curve[len(curve) // 2]
    first, last = curve[1] if len(curve) > 2 else curve[0], curve[-1]
    peak = max(point[2] for point in curve)
    print(
        f"\nRSS after {first[0]} passes: {first[2]:.1f} MiB; at {half[0]}: {half[2]:.1f} MiB; "
        f"at {last[0]}: {last[2]:.1f} MiB (peak {peak:.1f})"
    )
    first_half = (half[2] - first[2]) / max(1, half[0] - first[0]) * 1000
    second_half = (last[2] - half[2]) / max(1, last[0] - half[0]) * 1000
    print(f"growth per 1000 passes: first half {first_half:+.2f} MiB, second half {second_half:+.2f} MiB")
    print(f"{last[0] / last[3]:.0f} passes/s over {last[1]} calls")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifact", type=Path, help="an exported artifact (default: build a small random one)"
    )
    parser.add_argument("--passes", type=int, default=10_000, help="forward passes to run at least")
    parser.add_argument("--every", type=int, default=500, help="print RSS every this many passes")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "t3-onnx"
            child = multiprocessing.get_context("spawn").Process(
                target=build_small_artifact, args=(Path(tmp),)
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"building the small artifact failed (exit code {child.exitcode})")
        rt = DynaMoRuntime.load(artifact, threads=args.threads)
        model = rt.manifest.model
        print(
            f"torch loaded in this process: {'torch' in sys.modules}; artifact {artifact}: {model.num_token_heads} heads, {model.num_cache_layers} cache layers, "
            f"vocab {model.vocab_size}, context {model.context_length}, masks {'yes' if rt.masks else 'no'}"
        )
        summarize(soak(rt, args.passes, args.every, args.seed))


if __name__ == "__main__":
    main()
