"""The decoding step as a chain of named stages, written once (llama.cpp's sampler chain).

    dynamic:  propose -> joint -> weight -> static_threshold -> adaptive_threshold
              -> penalty -> backoff -> draw
    verify:   draft -> check -> residual

This list is the one place that says which stages exist and in which order. Three
implementations follow it, each keyed by the stage names and checked against this
list when it loads:
- runtime/dynamic.py and runtime/verify.py, the numpy path (`NUMPY_STAGES`);
- runtime/_stages.c, the compiled kernel, one C function per stage named `stage_<name>`
  (runtime/_native.c lists them in `_native.STAGES`); `kernel_covers` below is its
  capability gate, built from each stage's `kernel` predicate;
- tests/oracle.py, the plain test oracle (`ORACLE`).
docs/METHOD.md defines what every stage computes. Adding a stage means a Stage here,
its numpy function, its C function and its oracle function.

Stages from `joint` to `backoff` work on one candidate grid of n heads and may end it
early: each returns None once it has shown that the grid cannot beat its bound (every
stage after `weight` only lowers cells), which is the back-off decision taken sooner.
`beats` is that decision, the only place it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from runtime.config import SamplingConfig


@dataclass(frozen=True)
class Stage:
    """One step of the chain: what it does, which options it reads, whether the kernel covers it."""

    name: str
    does: str
    options: tuple[str, ...]  # the SamplingConfig fields it reads
    kernel: Callable[[SamplingConfig], bool]  # whether stage_<name> in _stages.c computes it for a config


def _always(config: SamplingConfig) -> bool:
    return True


DYNAMIC_STAGES: tuple[Stage, ...] = (
    Stage(
        "propose", "each head's top-k tokens and softmax(logits / T) there", ("top_k", "temperature"), _always
    ),
    Stage("joint", "the product of the heads' marginals over the grid of candidates", (), _always),
    Stage(
        "weight",
        "times the co-occurrence weight W ** alpha_c, rescaled to the grid's mass",
        ("alpha_c",),
        lambda c: c.alpha_c == 1,  # other powers need numpy's pow to round alike
    ),
    Stage("static_threshold", "cells below the static threshold become 0", ("static_threshold",), _always),
    Stage(
        "adaptive_threshold",
        "cells in Otsu's low class of the blurred joint become 0",
        ("adaptive", "blur"),
        lambda c: not c.adaptive or c.blur in (0, 1, 3),  # wider blurs follow scipy's rounding
    ),
    Stage(
        "penalty",
        "divide by the penalty once per already generated candidate",
        ("repetition_penalty",),
        _always,
    ),
    Stage("backoff", "emit n tokens only if the largest cell beats eps_b ** (n - 1)", ("eps_b",), _always),
    Stage("draw", "one cell by inverse CDF of one uniform (argmax when greedy)", ("temperature",), _always),
)

VERIFY_STAGES: tuple[Stage, ...] = (
    Stage(
        "draft",
        "heads 2..n draft from the co-occurrence-conditioned joint q",
        ("top_k", "temperature", "repetition_penalty", "alpha_c"),
        lambda c: c.alpha_c in (0, 1),
    ),
    Stage("check", "head 1 accepts each draft with probability min(1, p / q)", ("temperature",), _always),
    Stage("residual", "after a rejection, one token from norm(max(0, p - q))", (), _always),
)

# The stages that work on one candidate grid, in order.
GRID_STAGES = tuple(s.name for s in DYNAMIC_STAGES[1:-1])


def beats(peak: float, bound: float) -> bool:
    """The back-off rule: a grid whose largest cell is `peak` emits iff min(peak, 1) > bound.

    Clipping at 1 absorbs rounding above a probability of 1; the strict ">" makes
    eps_b = 0 emit whenever J has mass and eps_b = 1 never emit more than one token.
    """
    return min(peak, 1.0) > bound


def kernel_covers(stages: tuple[Stage, ...], config: SamplingConfig) -> bool:
    """Whether the compiled kernel computes every one of `stages` for `config`."""
    return all(stage.kernel(config) for stage in stages)


def check_implements(where: str, functions: Mapping[str, object], stages: tuple[Stage, ...]) -> None:
    """Fail loudly when an implementation's stage names drift from this list."""
    expected = [s.name for s in stages]
    if list(functions) != expected:
        raise ImportError(
            f"{where} implements stages {list(functions)}, but runtime/stages.py lists {expected}"
        )
