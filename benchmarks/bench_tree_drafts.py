"""Would verifying several candidate drafts per pass (a token tree) beat verify's chain? Measured.

A tree feeds, after head 1's token a, m candidates for the next token (drawn from the
conditioned draft q2) and under each candidate y one draft for the token after it (from
q3(. | a, y)): 2m + 1 tokens in one pass, with the multi-draft rule of SpecInfer (Miao et
al., 2024: candidate i passes with min(1, p_i(y) / q2(y)), after a rejection p_{i+1} =
norm(max(0, p_i - q2))), which keeps the output exactly `ar`'s. m = 1 is today's chain.

This script measures, on an artifact and a walk of `ar` samples over the prompts:
- tokens per pass of each m, exactly for the first level (the rule's acceptance, played with
  the real head-1 distribution p at a's position) and by one sampled path below it (head 1
  re-run after the accepted candidate y, acceptance of q3's draft = sum min(p, q3));
- one pass's time at 2m + 1 fed tokens (the tree's cost: a tree mask changes no arithmetic),
  after a 100-token cache, min over repeats, on one ONNX Runtime thread;
and prints tokens per pass, pass time and the wall-clock speed-up over `ar` they imply.

    python -m benchmarks.bench_tree_drafts --artifact out/reference-t3-onnx [--steps 400]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dynamo_bench.prompts import PAPER_PROMPTS
from runtime import DynaMoRuntime, SamplingConfig
from runtime.draws import sample_ar
from runtime.marginals import heads_topk
from runtime.tokensets import tokens_plus
from runtime.verify import ar_distribution, draft_distribution

PROMPTS = [*PAPER_PROMPTS[:5], "The os module provides", "def read_file(path):", "import os\n"]
WIDTHS = (1, 2, 3, 4)


def last_logits(rt: DynaMoRuntime, ids: list[int]) -> np.ndarray:
    """Every head's logits after `ids` (a fresh cache: this is a measurement, not a decoder)."""
    return rt.session.forward(rt.session.empty_cache(), ids, list(range(len(ids))))[:, -1]


def multi_round(p: dict[int, float], q_ids: np.ndarray, q: np.ndarray, m: int, rng) -> int | None:
    """SpecInfer's rule over m candidates drawn from q: the accepted candidate, or None."""
    target, q_of = dict(p), dict(zip(q_ids.tolist(), q.tolist(), strict=True))
    for _ in range(m):
        y = int(rng.choice(q_ids, p=q))
        if rng.random() < min(1.0, target.get(y, 0.0) / q_of[y]):
            return y
        left = {t: max(0.0, v - q_of.get(t, 0.0)) for t, v in target.items()}
        total = sum(left.values())
        if total <= 0:
            return None
        target = {t: v / total for t, v in left.items()}
    return None


def expected_tokens(rt: DynaMoRuntime, config: SamplingConfig, steps: int, seed: int) -> dict[int, float]:
    """{m: mean tokens per pass} over a walk of `ar` samples."""
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(WIDTHS, 0.0)
    done = 0
    while done < steps:
        context = rt.tokenizer.encode(PROMPTS[done % len(PROMPTS)]).ids
        for _ in range(24):
            logits = last_logits(rt, context)
            after = sample_ar(logits[0], context, config, rng)
            seen = tokens_plus(context, [after])
            tops = heads_topk(logits[1:], config.top_k, config.temperature)
            q2, _ = draft_distribution(tops[0], [after], seen, rt.masks, config)
            p = ar_distribution(last_logits(rt, [*context, after])[0], seen, config)
            p_dict = dict(zip(p.ids.tolist(), p.probs.tolist(), strict=True))
            below: dict[int, float] = {}  # accepted candidate -> acceptance of its one draft
            for m in WIDTHS:
                y = multi_round(p_dict, q2.ids, q2.probs, m, rng)
                if y is None:
                    totals[m] += 1.0
                    continue
                if y not in below:
                    path = [*context, after, y]
                    q3, _ = draft_distribution(
                        tops[1], [after, y], tokens_plus(context, [after, y]), rt.masks, config
                    )
                    p3 = ar_distribution(last_logits(rt, path)[0], path, config)
                    shared = np.intersect1d(p3.ids, q3.ids)
                    below[y] = float(
                        sum(min(p3.probs[p3.ids == t][0], q3.probs[q3.ids == t][0]) for t in shared)
                    )
                totals[m] += 2.0 + below[y]
            context = [*context, after]
            done += 1
            if done == steps:
                break
    return {m: total / steps for m, total in totals.items()}


def pass_ms(rt: DynaMoRuntime, fed: int, repeats: int) -> float:
    """min ms of one pass feeding `fed` tokens after a 100-token cache."""
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        cache = rt.session.empty_cache()
        rt.session.forward(cache, list(rng.integers(1, 1000, 100)), list(range(100)))
        start = time.perf_counter()
        rt.session.forward(cache, list(rng.integers(1, 1000, fed)), list(range(100, 100 + fed)))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def sampling_ms(rt: DynaMoRuntime, config: SamplingConfig) -> float:
    """Median sampling milliseconds per decode pass over a few generations."""
    per_pass = []
    for seed, prompt in enumerate(PROMPTS[:4]):
        stats = rt.generate(prompt, 64, config, seed=seed).stats
        per_pass.append(stats.decode_sampling_s / max(1, stats.forward_passes - 1) * 1e3)
    return statistics.median(per_pass)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact", default="out/reference-t3-onnx", help="exported artifact (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=400, help="verify passes to play (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=40, help="timed passes per size (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    rt = DynaMoRuntime.load(args.artifact, threads=1)
    config = SamplingConfig(mode="verify")
    tokens = expected_tokens(rt, config, args.steps, seed=0)
    sampling = {mode: sampling_ms(rt, config.replace(mode=mode)) for mode in ("ar", "verify")}
    ar_ms = pass_ms(rt, 1, args.repeats) + sampling["ar"]
    print(
        f"{args.steps} passes played; ar: {ar_ms:.2f} ms a pass with sampling; verify sampling "
        f"{sampling['verify']:.2f} ms a pass (counted m times for m candidates)"
    )
    print(f"{'m':>2} {'fed':>4} {'tokens/pass':>11} {'pass ms':>8} {'est. vs ar':>10}")
    for m, mean in tokens.items():
        fed = 2 * m + 1
        ms = pass_ms(rt, fed, args.repeats) + sampling["verify"] * m  # the check's work grows with m
        print(f"{m:>2} {fed:>4} {mean:>11.3f} {ms:>8.2f} {mean * ar_ms / ms:>9.2f}x")


if __name__ == "__main__":
    main()
