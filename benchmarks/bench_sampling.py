"""Time one sampling step of runtime/sampling.py (no model): min and median over repeats.

Per step the sampler gets 3 heads' logits at the last position (the top-k over
the whole vocabulary is part of the cost), 512 generated ids for the
repetition penalty, and optionally co-occurrence weights. The weights come
from a stub that returns a fixed sparse random grid, so the lookup in
runtime/cooccurrence.py is not timed here; only what the sampler does with W.

Two eps_b settings bound the work of Algorithm 1: eps_b = 0 emits at n = 3
after one grid; eps_b = 0.99 (random logits never reach it) builds the n = 3
and n = 2 grids and then samples head 1 -- the most a step can cost.

    python -m benchmarks.bench_sampling [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from runtime.config import SamplingConfig
from runtime.sampling import DynamicSampler, sample_ar

N_HEADS = 3
VARIANTS = {
    "plain": {"alpha_c": 0.0, "adaptive": False, "blur": 0},
    "masks": {"adaptive": False, "blur": 0},
    "masks+otsu": {"blur": 0},
    "masks+otsu+blur3": {},  # the paper's defaults
}


class StubMasks:
    """Fixed random W per grid shape (30% of pairs and 10% of triples seen): a lookup that costs nothing."""

    orders = (2, 3)

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._grids: dict[tuple[int, ...], np.ndarray] = {}

    def weights(self, ids):
        shape = tuple(len(x) for x in ids)
        if shape not in self._grids:
            density = 0.3 if len(shape) == 2 else 0.1
            seen = self._rng.random(shape) < density
            self._grids[shape] = (seen * self._rng.lognormal(0.0, 1.0, shape)).astype(np.float32)
        return self._grids[shape]


def time_steps(step, inputs: list, repeats: int) -> tuple[float, float]:
    for x in inputs[:5]:  # warm-up: buffers, caches
        step(x)
    times = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
    return min(times) * 1e6, statistics.median(times) * 1e6


def bench_ar(logits: list, generated: np.ndarray, k: int, repeats: int) -> tuple[float, float]:
    config, rng = SamplingConfig(mode="ar", top_k=k), np.random.default_rng(0)
    return time_steps(lambda x: sample_ar(x[0], generated, config, rng), logits, repeats)


def bench_dynamic(logits: list, generated: np.ndarray, config: SamplingConfig, repeats: int):
    sampler, masks, rng, emitted = DynamicSampler(), StubMasks(), np.random.default_rng(0), []

    def step(x):
        emitted.append(len(sampler.step(x, generated, masks, config, rng).tokens))

    best, median = time_steps(step, logits, repeats)
    return best, median, sum(emitted) / len(emitted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    print(
        f"{'vocab':>6} {'k':>3} {'variant':<17} {'eps_b':>5} {'min us':>9} {'median us':>10} {'emitted':>8}"
    )
    for vocab in (8192, 50304):
        logits = [(rng.normal(size=(N_HEADS, vocab)) * 3.0).astype(np.float32) for _ in range(20)]
        generated = rng.integers(0, vocab, size=512)
        for k in (10, 50):
            best, median = bench_ar(logits, generated, k, args.repeats)
            print(f"{vocab:>6} {k:>3} {'ar (head 1)':<17} {'-':>5} {best:>9.0f} {median:>10.0f} {1:>8}")
            for name, changes in VARIANTS.items():
                for eps_b in (0.0, 0.99):
                    config = SamplingConfig(top_k=k, eps_b=eps_b, **changes)
                    best, median, emitted = bench_dynamic(logits, generated, config, args.repeats)
                    print(
                        f"{vocab:>6} {k:>3} {name:<17} {eps_b:>5} {best:>9.0f} {median:>10.0f} {emitted:>8.2f}"
                    )


if __name__ == "__main__":
    main()
