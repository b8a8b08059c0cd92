"""Timing generate() calls side by side, and the latency figures derived from those timings.

Every runner (an artifact in one sampling mode, Optimum, PyTorch) is a callable
`runner(prompt_ids, max_new_tokens, seed) -> Sample`. `measure` runs the
warm-up calls, then `repeats` rounds; each round runs every runner over every
(prompt, seed) in turn, so slow drift of a shared machine hits all runners
alike instead of whichever ran last. Sampling is seeded, so every round
generates the same tokens; only the clock differs (checked: `deterministic`).

Figures per runner (`summarize`), each computed per round and reported as the
best and the median over rounds ("best" = the minimum of a time, the maximum
of a rate):
- prefill_ms: mean time to the first new token (runtime: the decoder's first
  pass + its sampling; transformers/Optimum: generate() start to the streamer
  receiving the first new token);
- decode_ms_per_pass / decode_ms_per_token: time after the first pass over the
  passes / tokens after it;
- tokens_per_s: new tokens over the wall-clock of whole generate() calls, the
  figure users feel and the one every wall-clock speed-up divides;
- ort_share / sampling_share: shares of decode time in ONNX Runtime and in the
  sampler (the rest is the loop's bookkeeping).
Per-call figures (`per_call`), the distribution a user of one request sees:
p50 and p90 over every timed call of a runner (all prompts, seeds and rounds) of
- ttft_ms: the call's time to its first token (as prefill_ms, for one call);
- decode_ms_per_pass / decode_ms_per_token: the call's decode time over its
  passes / tokens after the first pass (for Optimum/PyTorch: wall-clock after
  the first token over the tokens after it; one token per pass), i.e. each
  call's mean, as serving benchmarks report time per output token per request.
Counted figures (the same in every round): tokens per pass, the share of passes
emitting 1/2/3 tokens, back-offs per pass, verify's acceptance rate, its acceptance per
draft position and its mean tokens emitted per pass (dynamo_bench/speculative.py).
peak_rss_mb is the largest resident set size sampled every 5 ms while the
runner ran (the whole process: runtime, Python, and everything else loaded --
every runner shares the process); rss_growth_mb is how far it rose above the
RSS at the start of the runner's round (its working memory: caches, buffers).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import psutil
from tqdm.auto import tqdm

from dynamo_bench.prompts import Prompt
from runtime import DynaMoRuntime, SamplingConfig

RSS_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Sample:
    """What one generate() call produced and how long it took."""

    token_ids: tuple[int, ...]
    wall_s: float
    prefill_s: float
    stats: dict | None = None  # runtime GenerationStats.to_dict(); None for transformers/Optimum


@dataclass(frozen=True)
class Call:
    label: str
    prompt_index: int
    seed: int
    repeat: int
    sample: Sample


Runner = Callable[[Sequence[int], int, int], Sample]


class RuntimeRunner:
    """An artifact in one sampling mode; wall-clock around DynaMoRuntime.generate()."""

    def __init__(self, runtime: DynaMoRuntime, config: SamplingConfig):
        self.runtime = runtime
        self.config = config

    def __call__(self, prompt_ids: Sequence[int], max_new_tokens: int, seed: int) -> Sample:
        start = time.perf_counter()
        result = self.runtime.generate(list(prompt_ids), max_new_tokens, self.config, seed)
        wall = time.perf_counter() - start
        return Sample(tuple(result.token_ids), wall, result.stats.prefill_s, result.stats.to_dict())


class RssMonitor:
    """Peak resident set size of this process while the `with` block runs, polled from a thread."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self.start_bytes = self._process.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


@dataclass
class Measurement:
    calls: dict[str, list[Call]] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    # Peak minus the RSS at the start of the runner's round: its own working memory.
    rss_growth_bytes: dict[str, int] = field(default_factory=dict)


def measure(
    runners: dict[str, Runner],
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    max_new_tokens: int,
    repeats: int,
    warmup: int,
    progress: bool = True,
) -> Measurement:
    """Warm every runner up, then run `repeats` interleaved rounds over all prompts and seeds."""
    result = Measurement({k: [] for k in runners}, {k: 0 for k in runners}, {k: 0 for k in runners})
    total = len(runners) * (warmup + repeats * len(prompts) * len(seeds))
    with tqdm(total=total, desc="dynamo-bench", unit="call", disable=not progress) as bar:
        for label, runner in runners.items():
            bar.set_postfix_str(f"warm-up {label}")
            for _ in range(warmup):
                runner(prompts[0].ids, max_new_tokens, seeds[0])
                bar.update(1)
        for repeat in range(repeats):
            for label, runner in runners.items():
                bar.set_postfix_str(f"round {repeat + 1}/{repeats} {label}")
                with RssMonitor() as rss:
                    for index, prompt in enumerate(prompts):
                        for seed in seeds:
                            sample = runner(prompt.ids, max_new_tokens, seed)
                            result.calls[label].append(Call(label, index, seed, repeat, sample))
                            bar.update(1)
                result.peak_rss_bytes[label] = max(result.peak_rss_bytes[label], rss.peak_bytes)
                growth = rss.peak_bytes - rss.start_bytes
                result.rss_growth_bytes[label] = max(result.rss_growth_bytes[label], growth)
    return result


def _round_figures(calls: Sequence[Call]) -> dict[str, float | None]:
    """Latency figures of one round of one runner (see the module docstring)."""
    samples = [c.sample for c in calls]
    new = sum(len(s.token_ids) for s in samples)
    wall = sum(s.wall_s for s in samples)
    prefill = sum(s.prefill_s for s in samples)
    if all(s.stats is not None for s in samples):
        decode = sum(s.stats["decode_s"] for s in samples)
        passes = sum(s.stats["forward_passes"] - 1 for s in samples)
        tokens = sum(s.stats["new_tokens"] - s.stats["first_pass_tokens"] for s in samples)
        ort = sum(s.stats["decode_ort_s"] for s in samples)
        sampling = sum(s.stats["decode_sampling_s"] for s in samples)
    else:  # one token per pass; everything after the first token is decode
        decode = wall - prefill
        tokens = passes = sum(max(len(s.token_ids) - 1, 0) for s in samples)
        ort = sampling = None
    return {
        "prefill_ms": 1000 * prefill / len(samples),
        "decode_ms_per_pass": 1000 * decode / passes if passes else None,
        "decode_ms_per_token": 1000 * decode / tokens if tokens else None,
        "tokens_per_s": new / wall if wall > 0 else None,
        "decode_tokens_per_s": tokens / decode if decode > 0 else None,
        "ort_share": ort / decode if ort is not None and decode > 0 else None,
        "sampling_share": sampling / decode if sampling is not None and decode > 0 else None,
    }


LOWER_IS_BETTER = ("prefill_ms", "decode_ms_per_pass", "decode_ms_per_token")
PERCENTILES = (50, 90)


def _call_figures(sample: Sample) -> dict[str, float | None]:
    """One call's time to first token and its mean decode time per pass and per token, in ms."""
    if sample.stats is not None:
        decode = sample.stats["decode_s"]
        passes = sample.stats["forward_passes"] - 1
        tokens = sample.stats["new_tokens"] - sample.stats["first_pass_tokens"]
    else:  # transformers/Optimum: one token per pass, everything after the first token is decode
        decode = sample.wall_s - sample.prefill_s
        passes = tokens = max(len(sample.token_ids) - 1, 0)
    return {
        "ttft_ms": 1000 * sample.prefill_s,
        "decode_ms_per_pass": 1000 * decode / passes if passes > 0 else None,
        "decode_ms_per_token": 1000 * decode / tokens if tokens > 0 else None,
    }


def per_call_percentiles(calls: Sequence[Call]) -> dict[str, dict]:
    """p50/p90 (numpy's linear interpolation) of each per-call figure over `calls`, with the count."""
    figures = [_call_figures(c.sample) for c in calls]
    out = {}
    for name in ("ttft_ms", "decode_ms_per_pass", "decode_ms_per_token"):
        values = [f[name] for f in figures if f[name] is not None]
        row: dict = {f"p{q}": float(np.percentile(values, q)) if values else None for q in PERCENTILES}
        out[name] = {**row, "calls": len(values)}
    return out


def _best_and_median(name: str, values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"best": None, "median": None, "per_repeat": values}
    best = min(present) if name in LOWER_IS_BETTER else max(present)
    return {"best": best, "median": statistics.median(present), "per_repeat": values}


def _counts(calls: Sequence[Call]) -> dict:
    """Tokens per pass, emission shares, back-offs, acceptance: from one round's decoder stats."""
    stats = [c.sample.stats for c in calls]
    new = sum(len(c.sample.token_ids) for c in calls)
    if any(s is None for s in stats):  # transformers/Optimum: autoregressive, one token per forward pass
        return {"new_tokens": new, "forward_passes": new, "tokens_per_pass": 1.0 if new else None}
    passes = sum(s["forward_passes"] for s in stats)
    emissions: dict[str, int] = {}
    for s in stats:
        for k, v in s["emissions"].items():
            emissions[k] = emissions.get(k, 0) + v
    drafted = sum(s["drafted"] for s in stats)
    checked: list[int] = []
    accepted: list[int] = []
    for s in stats:
        for j, (c, a) in enumerate(zip(s["checked_at"], s["accepted_at"], strict=True)):
            if j == len(checked):
                checked.append(0)
                accepted.append(0)
            checked[j] += c
            accepted[j] += a
    rounds = sum(emissions.values())
    return {
        "new_tokens": new,
        "forward_passes": passes,
        "tokens_per_pass": new / passes if passes else None,
        "emission_share": {k: v / passes for k, v in sorted(emissions.items())},
        "mean_emitted": sum(int(k) * v for k, v in emissions.items()) / rounds if rounds else None,
        "backoffs_per_pass": sum(s["backoffs"] for s in stats) / passes if passes else None,
        "acceptance_rate": sum(s["accepted"] for s in stats) / drafted if drafted else None,
        "acceptance_by_position": [a / c if c else None for a, c in zip(accepted, checked, strict=True)]
        or None,
    }


def summarize(calls: Sequence[Call], peak_rss_bytes: int, rss_growth_bytes: int = 0) -> dict:
    """Latency figures of one runner: best/median over rounds, per-call p50/p90 over every call, plus
    counts from the first round."""
    repeats = sorted({c.repeat for c in calls})
    rounds = [_round_figures([c for c in calls if c.repeat == r]) for r in repeats]
    figures = {name: _best_and_median(name, [f[name] for f in rounds]) for name in rounds[0]}
    first = [c for c in calls if c.repeat == repeats[0]]
    tokens = {}
    for c in calls:
        tokens.setdefault((c.prompt_index, c.seed), set()).add(c.sample.token_ids)
    return {
        **figures,
        "per_call": per_call_percentiles(calls),
        **_counts(first),
        "peak_rss_mb": peak_rss_bytes / 2**20,
        "rss_growth_mb": rss_growth_bytes / 2**20,
        "deterministic": all(len(v) == 1 for v in tokens.values()),
    }


def speedups(latency: dict[str, dict], references: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Median wall-clock tokens/s of each runner over that of each reference present in the run."""
    out = {}
    for label, figures in latency.items():
        mine = figures["tokens_per_s"]["median"]
        out[label] = {}
        for ref in references:
            theirs = latency.get(ref, {}).get("tokens_per_s", {}).get("median")
            out[label][f"vs_{ref}"] = mine / theirs if mine and theirs else None
    return out
