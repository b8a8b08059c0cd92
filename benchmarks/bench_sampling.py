"""Time one sampling step of runtime/sampling.py (no model): min and median over repeats.

Per step the sampler gets 3 heads' logits at the last position (the top-k over
the whole vocabulary is part of the cost), 512 generated ids for the
repetition penalty (as an int64 array; a Python list adds its conversion), and
optionally co-occurrence weights. The weights come from a stub that returns a
fixed sparse random grid, so the lookup in runtime/cooccurrence.py is not timed
here; only what the sampler does with W, on its numpy path (the compiled kernel reads
real CSR masks: benchmarks/bench_sampler_kernel.py compares the two on an artifact).

Three eps_b settings span the work of Algorithm 1:
- 0 ("passes"): every step emits at n = 3 after one full grid -- weighting,
  blur, Otsu, penalty and a draw -- the most grid work a step that emits does;
- 0.5 (the paper's setting): a mix of emissions and back-offs;
- 0.99 ("backs off"; random logits never reach it): without weights the step
  backs off before building any grid (the product of the heads' top
  probabilities bounds J); with weights after weighting each grid, before the
  blur. A step costs more than both only when Otsu or the penalty is what
  brings the grid's largest entry under the bound.

    python -m benchmarks.bench_sampling [--repeats 50] [--vocab 8192 50304] [--top-k 10 50]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from runtime.config import SamplingConfig
from runtime.draws import sample_ar
from runtime.dynamic import DynamicSampler

N_HEADS = 3
VARIANTS = {
    "plain": {"alpha_c": 0.0, "adaptive": False, "blur": 0},
    "masks": {"adaptive": False, "blur": 0},
    "masks+otsu": {"blur": 0},
    "otsu+blur3": {"alpha_c": 0.0},  # the paper's defaults on an artifact without masks
    "masks+otsu+blur3": {},  # the paper's defaults
}
EPS_B = {0.0: "passes", 0.5: "mix", 0.99: "backs off"}


class StubMasks:
    """Fixed random W per grid shape (30% of pairs and 10% of triples seen): a lookup that costs nothing."""

    orders = (2, 3)

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._grids: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def hits(self, ids):
        shape = tuple(len(x) for x in ids)
        if shape not in self._grids:
            density = 0.3 if len(shape) == 2 else 0.1
            seen = self._rng.random(math.prod(shape)) < density
            cells = np.flatnonzero(seen)
            self._grids[shape] = (cells, self._rng.lognormal(0.0, 1.0, cells.size).astype(np.float32))
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
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 50304])
    parser.add_argument("--top-k", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    print(
        f"{'vocab':>6} {'k':>3} {'variant':<17} {'eps_b':>5} {'case':<9} "
        f"{'min us':>8} {'median us':>9} {'emitted':>7}"
    )
    for vocab in args.vocab:
        logits = [(rng.normal(size=(N_HEADS, vocab)) * 3.0).astype(np.float32) for _ in range(20)]
        generated = rng.integers(0, vocab, size=512)
        for k in args.top_k:
            best, median = bench_ar(logits, generated, k, args.repeats)
            print(
                f"{vocab:>6} {k:>3} {'ar (head 1)':<17} {'-':>5} {'':<9} {best:>8.0f} {median:>9.0f} {1:>7}"
            )
            for name, changes in VARIANTS.items():
                for eps_b, case in EPS_B.items():
                    config = SamplingConfig(top_k=k, eps_b=eps_b, **changes)
                    best, median, emitted = bench_dynamic(logits, generated, config, args.repeats)
                    print(
                        f"{vocab:>6} {k:>3} {name:<17} {eps_b:>5} {case:<9} "
                        f"{best:>8.0f} {median:>9.0f} {emitted:>7.2f}"
                    )


if __name__ == "__main__":
    main()
