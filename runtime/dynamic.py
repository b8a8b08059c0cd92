"""The `dynamic` sampler: Algorithm 1 as the chain of runtime/stages.py, in numpy or in one C call.

A decoding step gets every head's logits at the last position and returns the 1..n
tokens to emit:

    propose (top-k per head)
    for n = heads .. 2:  joint -> weight -> static_threshold -> adaptive_threshold
                         -> penalty -> backoff          (any of them may back off early)
                         if the grid survived: draw a cell, emit its n tokens
    n = 1: draw one token from head 1 alone (the code path of `ar`)

docs/METHOD.md defines every stage; tests/oracle.py is the same chain written plainly,
and the tests hold this one equal to it (same joint, same decisions, same random numbers).
Where the compiled kernel covers the whole step (runtime/native.py: co-occurrence
weights at every n, and the settings `stages.kernel_covers` accepts) the step is one C
call, to the same bits; where it covers the grid's first stages only, those run in C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from runtime.config import SamplingConfig
from runtime.draws import draw_head1
from runtime.grid import (
    CooccurrenceWeights,
    Grid,
    GridContext,
    Scratch,
    backoff,
    joint,
    penalty,
    running_sum,
    static_threshold,
    weight,
)
from runtime.marginals import TopK, check_logits, heads_topk
from runtime.native import AVAILABLE, GRID_CALL, NativeSampler, supports_grid
from runtime.otsu import adaptive_threshold
from runtime.stages import DYNAMIC_STAGES, GRID_STAGES, beats, check_implements
from runtime.tokensets import Generated, seen_mask, token_set


class StepResult(NamedTuple):
    """A step's outcome (a named tuple: made every pass, and cheaper to make than a dataclass)."""

    tokens: tuple[int, ...]  # 1..n tokens to emit, in order
    backoffs: int  # times n was lowered before emitting (n_heads - len(tokens))


def propose(logits: np.ndarray, config: SamplingConfig, use_native: bool = True) -> list[TopK]:
    """Each head's top-k candidates and their probabilities (runtime/marginals.py)."""
    return heads_topk(logits, config.top_k, config.temperature or 1.0, use_native)


def draw(found: Grid, config: SamplingConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """The tokens of one cell of the grid, drawn from J (its argmax when greedy)."""
    cell = np.unravel_index(found.draw(config.greedy, rng), found.shape)
    return tuple(int(t.ids[i]) for t, i in zip(found.topks, cell, strict=True))


NUMPY_STAGES = {
    "propose": propose,
    "joint": joint,
    "weight": weight,
    "static_threshold": static_threshold,
    "adaptive_threshold": adaptive_threshold,
    "penalty": penalty,
    "backoff": backoff,
    "draw": draw,
}
check_implements("runtime/dynamic.py", NUMPY_STAGES, DYNAMIC_STAGES)
_GRID_CHAIN = tuple(NUMPY_STAGES[name] for name in GRID_STAGES)


class DynamicSampler:
    """Algorithm 1 for one generation stream, with scratch grids kept between steps (not thread-safe).

    Every cell of J and every emit/back-off decision is the one the plain whole-grid
    computation gives, to the last bit; the speed comes from skipping work that cannot
    change them. With weights J lives on the stored n-grams alone (a few thousand of
    125k cells), and Otsu only needs the blurred grid near J's largest cells; it usually
    keeps a few dozen, and the penalty and the draw then work on those alone.
    """

    def __init__(self, use_native: bool = True) -> None:
        """`use_native=False` keeps to numpy where the compiled kernel (runtime/native.py) would serve."""
        self._scratch = Scratch()
        self._native = NativeSampler() if use_native and AVAILABLE else None

    def step(
        self,
        logits: np.ndarray,
        generated: Generated,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
        rng: np.random.Generator,
    ) -> StepResult:
        """Tokens to emit from one forward pass; `logits` is (n_heads, vocab) at the last position.

        `generated` is cheapest as a `SeenTokens` kept by the caller (anything else is sorted
        every step).
        """
        logits = check_logits(logits)
        n_heads, vocab = logits.shape
        # eps_b = 1 can never emit more than one token: skip building the grids.
        used = n_heads if config.eps_b < 1 else 1
        if self._native is not None and self._native.can_step(masks, config, used, min(config.top_k, vocab)):
            tokens = self._native.step(logits, seen_mask(generated, vocab), rng)
            if tokens is not None:  # None: logits the kernel does not read (native.reads)
                return StepResult(tokens, n_heads - len(tokens))
        ctx = GridContext(masks, config, token_set(generated), self._scratch)
        topks = propose(logits[:used], config, self._native is not None)
        for n in range(used, 1, -1):
            found = self._run_grid(Grid(topks[:n], config.eps_b ** (n - 1)), ctx)
            if found is not None:
                return StepResult(draw(found, config, rng), n_heads - n)
        return StepResult((draw_head1(topks[0], ctx.generated, config, rng),), n_heads - 1)

    def joint(
        self,
        topks: Sequence[TopK],
        generated: Generated,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
    ) -> np.ndarray:
        """J over the grid of `topks` after every grid stage (no bound: nothing backs off).

        The array may be a scratch buffer of this sampler, valid until its next call.
        """
        found = self._run_grid(
            Grid(topks, -math.inf), GridContext(masks, config, token_set(generated), self._scratch)
        )
        assert found is not None  # every J beats -inf
        return found.dense()

    def _run_grid(self, candidates: Grid, ctx: GridContext) -> Grid | None:
        """The grid stages in order, stopping at the first that backs off."""
        chain = _GRID_CHAIN
        if self._compiles(candidates, ctx):
            chain = (self._compiled_grid, *_GRID_CHAIN[len(GRID_CALL) :])
        found: Grid | None = candidates
        for stage in chain:
            found = stage(found, ctx)
            if found is None:
                return None
        return found

    def _compiles(self, candidates: Grid, ctx: GridContext) -> bool:
        """Whether the kernel's grid call serves this grid's first stages (GRID_CALL)."""
        return (
            self._native is not None
            and ctx.weighted(len(candidates.topks))
            and hasattr(ctx.masks, "csr_tables")
            and supports_grid(len(candidates.topks), math.prod(candidates.shape), ctx.config)
        )

    def _compiled_grid(self, candidates: Grid, ctx: GridContext) -> Grid | None:
        """The stages of GRID_CALL in one kernel call, to the bits of the numpy stages."""
        mass = math.prod(running_sum(t.probs) for t in candidates.topks)
        if not beats(mass * (1 + 1e-9), candidates.bound):  # as grid.joint
            return None
        config = ctx.config
        found = self._native.joint(
            [t.ids for t in candidates.topks],
            [t.probs for t in candidates.topks],
            ctx.masks.csr_tables(),
            mass,
            candidates.bound,
            config.static_threshold,
            config.adaptive,
            config.blur,
        )
        if found is None:
            return None
        candidates.cells, candidates.values = found
        return candidates
