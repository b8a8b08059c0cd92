"""verify with and without dropping rejected drafts' cache slots (GraphSession.compact), side by side.

verify feeds [token, drafts...] and masks the slots of the drafts head 1 rejects, about one a
pass; every later pass pays for them in the cache concatenation and the attention. The
decoding loop drops them once they are an eighth of the cache (runtime/generation.py). This
script generates with an exported artifact in verify mode at its default sampling settings,
once with that rule and once never compacting, the two interleaved call by call, and prints
tokens/s (min/median over rounds) and the ratio, at each --max-new-tokens. Runtime only: this
process never imports torch. ONNX Runtime runs on --threads (default 1; 0 = its default).

    python -m benchmarks.bench_cache_compaction --artifact out/reference-t3-onnx [--tokens 64,256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from runtime import DynaMoRuntime, generation

PROMPTS = ("The os module", "Return the number of", "In Python 3.8, the", "This function is")
NEVER = sys.maxsize


def tokens_per_s(rt: DynaMoRuntime, config, max_new_tokens: int, min_dead: int, seeds: int) -> float:
    """New tokens over wall-clock for every prompt x seed, with compaction from `min_dead` slots."""
    generation.COMPACT_MIN_DEAD = min_dead  # the loop reads it at each pass
    tokens, start = 0, time.perf_counter()
    for prompt in PROMPTS:
        for seed in range(seeds):
            tokens += len(rt.generate(prompt, max_new_tokens, config, seed=seed).token_ids)
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", required=True, help="an exported DynaMo artifact (2+ heads)")
    parser.add_argument("--tokens", default="64,256", help="comma-separated --max-new-tokens values")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads; 0 = ORT's default")
    args = parser.parse_args(argv)
    rt = DynaMoRuntime.load(args.artifact, threads=args.threads or None)
    config = rt.default_config.replace(mode="verify")
    rule = generation.COMPACT_MIN_DEAD
    threads = args.threads or "ORT default"
    print(f"{args.artifact}: verify, {len(PROMPTS)} prompts x {args.seeds} seeds, {threads} thread(s)")
    print(f"{'new tokens':>10} {'never (tok/s)':>22} {'compact (tok/s)':>22} {'ratio of medians':>17}")
    for max_new in (int(t) for t in args.tokens.split(",")):
        runs: dict[str, list[float]] = {"never": [], "compact": []}
        tokens_per_s(rt, config, max_new, rule, 1)  # warm-up
        for _ in range(args.rounds):
            runs["never"].append(tokens_per_s(rt, config, max_new, NEVER, args.seeds))
            runs["compact"].append(tokens_per_s(rt, config, max_new, rule, args.seeds))
        cells = [f"{min(v):8.1f} / {statistics.median(v):8.1f}" for v in runs.values()]
        ratio = statistics.median(runs["compact"]) / statistics.median(runs["never"])
        print(f"{max_new:>10} {cells[0]:>22} {cells[1]:>22} {ratio:>16.3f}x")
    generation.COMPACT_MIN_DEAD = rule
    print("cells: min / median tokens/s over rounds")


if __name__ == "__main__":
    main()
