"""The compiled sampler kernel against the numpy path, side by side, on a real artifact.

Two measurements, each min/median over rounds:

1. Replayed steps. One dynamic generation per prompt records every sampler call
   (logits of all heads at the last position, the history); both samplers then
   replay the same calls, warm, and after a 40 MB pass over memory before every
   step that evicts the caches as a forward pass does ("cold"). Their outputs are
   asserted identical.
2. Live generation: sampling time per pass over ONNX Runtime time per pass (the
   runtime issue's budget is 0.15) for ar, dynamic and verify, with the kernel on,
   and off (a child process with DYNAMO_NATIVE=0).

    python -m benchmarks.bench_sampler_kernel [--artifact out/reference-t3-onnx] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from runtime import DynaMoRuntime, SamplingConfig, native
from runtime.dynamic import DynamicSampler
from runtime.tokensets import SeenTokens

PROMPTS = [
    "I am a student at the",
    "def read_file(path):",
    "The os module provides",
    "How can we",
    "Please explain",
    "import os\n",
]
FLUSH = np.ones(5_000_000)  # 40 MB: about what one forward pass of the reference model streams


def record_steps(rt: DynaMoRuntime, max_new_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
    calls = []
    original = DynamicSampler.step

    def spy(self, logits, generated, masks, config, rng):
        history = generated.mask.nonzero()[0] if isinstance(generated, SeenTokens) else generated
        calls.append((np.array(logits), np.array(history, dtype=np.int64)))
        return original(self, logits, generated, masks, config, rng)

    DynamicSampler.step = spy
    try:
        for seed, prompt in enumerate(PROMPTS):
            rt.generate(
                prompt, max_new_tokens=max_new_tokens, config=SamplingConfig(mode="dynamic"), seed=seed
            )
    finally:
        DynamicSampler.step = original
    return calls


def replay(calls, masks, rounds: int) -> None:
    config = SamplingConfig()
    samplers = {"numpy": DynamicSampler(use_native=False), "kernel": DynamicSampler()}
    times = {(name, cold): [] for name in samplers for cold in (False, True)}
    for _ in range(rounds):
        for cold in (False, True):
            outputs = {}
            for name, sampler in samplers.items():
                rng, total, out = np.random.default_rng(0), 0.0, []
                for logits, history in calls:
                    if cold:
                        FLUSH.sum()
                    start = time.perf_counter()
                    out.append(sampler.step(logits, history, masks, config, rng))
                    total += time.perf_counter() - start
                times[(name, cold)].append(total / len(calls) * 1e3)
                outputs[name] = out
            assert outputs["numpy"] == outputs["kernel"], "the kernel and numpy disagree"
    print(f"replayed {len(calls)} dynamic steps (defaults), ms per step, min / median of {rounds} rounds:")
    for cold in (False, True):
        row = {name: times[(name, cold)] for name in samplers}
        ratio = min(row["numpy"]) / min(row["kernel"])
        cells = "  ".join(f"{n} {min(t):.3f} / {statistics.median(t):.3f}" for n, t in row.items())
        print(f"  {'cold' if cold else 'warm'}: {cells}  ->  {ratio:.2f}x")


def live_shares(artifact: str, rounds: int, max_new_tokens: int, threads: int) -> dict:
    """{mode: [share per round]} plus per-pass milliseconds, in this process."""
    rt = DynaMoRuntime.load(artifact, provider="cpu", threads=threads or None)
    result = {}
    for mode in ("ar", "dynamic", "verify"):
        rounds_out = []
        for _ in range(rounds):
            sampling_s = ort_s = passes = 0
            for seed, prompt in enumerate(PROMPTS):
                stats = rt.generate(prompt, max_new_tokens, config=SamplingConfig(mode=mode), seed=seed).stats
                sampling_s += stats.decode_sampling_s
                ort_s += stats.decode_ort_s
                passes += stats.forward_passes
            rounds_out.append((sampling_s / ort_s, sampling_s / passes * 1e3, ort_s / passes * 1e3))
        result[mode] = rounds_out
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="out/reference-t3-onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime threads for the live runs (0: its default, all cores)",
    )
    parser.add_argument("--live-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.live_only:
        print(json.dumps(live_shares(args.artifact, args.rounds, args.max_new_tokens, args.threads)))
        return
    if not native.AVAILABLE:
        sys.exit("the compiled kernel is not built (or DYNAMO_NATIVE=0): nothing to compare")

    rt = DynaMoRuntime.load(args.artifact, provider="cpu", threads=1)
    replay(record_steps(rt, args.max_new_tokens), rt.masks, args.rounds)

    threads = f"{args.threads} ONNX Runtime thread(s)" if args.threads else "ONNX Runtime's default threads"
    print(f"\nlive generation, {threads}: sampling / ORT time per pass, min / median of rounds")
    child = [sys.executable, "-m", "benchmarks.bench_sampler_kernel", "--live-only", "--artifact", args.artifact,
             "--rounds", str(args.rounds), "--max-new-tokens", str(args.max_new_tokens),
             "--threads", str(args.threads)]  # fmt: skip
    runs = {}
    for name, env in (("kernel", {}), ("numpy", {"DYNAMO_NATIVE": "0"})):
        done = subprocess.run(child, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in runs["kernel"]:
        cells = []
        for name, run in runs.items():
            shares = [r[0] for r in run[mode]]
            best = min(run[mode])
            cells.append(
                f"{name} {min(shares):.3f} / {statistics.median(shares):.3f} "
                f"({best[1]:.3f} ms sampling, {best[2]:.3f} ms ORT)"
            )
        print(f"  {mode:8s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
