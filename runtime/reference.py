"""A slow, plain implementation of DynaMo's Algorithm 1, to check the fast sampler against.

Written straight from shared/DYNAMO.md with loops over candidates, dicts and
exact rational arithmetic where it is cheap; every choice the paper leaves
open is the one runtime/sampling.py documents. Only tests and debugging use it.

    for every head i:
        f_i = softmax(logits_i / T) over the vocabulary      (T = 1 when greedy)
        C_i = the top_k tokens of head i, ordered by (-logit, token id)
    for n = n_heads, n_heads - 1, ..., 2:
        for every cell c of C_1 x ... x C_n (in that order):
            J(c) = f_1(c_1) * ... * f_n(c_n) * W(c) ** alpha_c
        J = J * (sum over cells of f_1(c_1) ... f_n(c_n)) / (sum of J)   # redistribute, never create
        J(c) = 0 where J(c) < static_threshold
        if adaptive:
            B = J blurred with the binomial kernel of size `blur`, axis by axis, mirrored borders
            put B in 256 equal bins over [min B, max B]; pick Otsu's split
            J(c) = 0 where B(c) falls in the low class
        J(c) = J(c) / penalty ** (number of the c_i already generated)
        if min(max J, 1) > eps_b ** (n - 1):
            return the cell drawn from J (or its argmax when greedy)
    return a token drawn from f_1(a) / penalty ** [a generated] over C_1

A draw uses one u = rng.random(): the first cell, in order, whose running sum
exceeds u * (sum of all weights).

Two correct implementations round differently in the last bits, so a decision
taken exactly at a boundary (a value on an Otsu bin edge, J at the static
threshold or at the back-off bound, two cells tied for the argmax) can go
either way. Such boundaries do occur: a blurred grid with two live cells can
put a value exactly halfway between min and max. Functions here take an
optional `ties` list and record every decision within rounding of its
boundary, so a comparison can tell a real difference from a coin toss.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

from runtime.config import SamplingConfig

BINS = 256
NEAR = 1e-9  # relative distance to a boundary that rounding could cross


def candidates(logits_row, top_k: int, temperature: float) -> list[tuple[int, float]]:
    """[(token, f(token))] for the top_k tokens by (-logit, id) under softmax(logits / temperature)."""
    logits = [float(x) for x in logits_row]
    top = max(logits)
    exps = [math.exp((x - top) / temperature) for x in logits]
    total = math.fsum(exps)
    ranked = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    return [(i, exps[i] / total) for i in ranked[:top_k]]


def joint(heads: list[list[tuple[int, float]]], generated, masks, config: SamplingConfig, ties=None) -> dict:
    """J of Algorithm 1 over the candidates `heads` (one list per head), keyed by cell position."""
    generated = {int(t) for t in generated}
    cells = list(itertools.product(*(range(len(h)) for h in heads)))
    product = {c: math.prod(heads[i][c[i]][1] for i in range(len(c))) for c in cells}

    weights = None
    if masks is not None and config.alpha_c > 0 and len(heads) in masks.orders:
        weights = masks.weights([np.array([t for t, _ in h]) for h in heads])
    if weights is None:
        grid = dict(product)
    else:
        raw = {c: product[c] * float(weights[c]) ** config.alpha_c for c in cells}
        raw_total = math.fsum(raw.values())
        mass = math.fsum(product.values())
        grid = {c: (v * (mass / raw_total) if raw_total > 0 else 0.0) for c, v in raw.items()}

    for c in cells:
        _note(ties, grid[c], config.static_threshold, "static threshold")
        if grid[c] < config.static_threshold:
            grid[c] = 0.0

    if config.adaptive:
        shape = [len(h) for h in heads]
        blurred = blur(grid, shape, config.blur)
        low = otsu_low_class(blurred, ties)
        for c in cells:
            if low[c]:
                grid[c] = 0.0

    for c in cells:
        repeats = sum(heads[i][c[i]][0] in generated for i in range(len(c)))
        grid[c] = grid[c] / config.repetition_penalty**repeats
    return grid


def blur(grid: dict, shape: list[int], size: int) -> dict:
    """Separable binomial blur of width `size`, borders mirrored without repeating the edge cell."""
    if size <= 1:
        return dict(grid)
    weights = [math.comb(size - 1, j) / 2.0 ** (size - 1) for j in range(size)]
    half = size // 2
    out = dict(grid)
    for axis in range(len(shape)):
        src, out = out, {}
        for c in src:
            # Symmetric kernel: centre, then pairs from the outside in (the order scipy adds them).
            value = src[c] * weights[half]
            for d in range(half, 0, -1):
                left = _shifted(c, axis, -d, shape)
                right = _shifted(c, axis, d, shape)
                value += (src[left] + src[right]) * weights[half - d]
            out[c] = value
    return out


def _shifted(cell: tuple, axis: int, offset: int, shape: list[int]) -> tuple:
    moved = list(cell)
    moved[axis] = _mirror(cell[axis] + offset, shape[axis])
    return tuple(moved)


def _mirror(i: int, length: int) -> int:
    if length == 1:
        return 0
    period = 2 * (length - 1)
    i %= period
    return period - i if i >= length else i


def otsu_low_class(values: dict, ties=None) -> dict:
    """{cell: True if Otsu's split of a 256-bin histogram puts it in the low class}."""
    lo, hi = min(values.values()), max(values.values())
    if not hi > lo:
        return dict.fromkeys(values, False)
    scale = BINS / (hi - lo)
    for v in values.values():
        position = (v - lo) * scale
        if 0 < round(position) < BINS:  # the outer edges are safe: nothing is below min or above max
            _note(ties, position, round(position), "Otsu bin edge", absolute=BINS * NEAR)
    bins = {c: min(int((v - lo) * scale), BINS - 1) for c, v in values.items()}
    counts = [0] * BINS
    for b in bins.values():
        counts[b] += 1
    best_split, best_score = None, None
    for split in range(BINS - 1):
        low = [(b, counts[b]) for b in range(split + 1) if counts[b]]
        high = [(b, counts[b]) for b in range(split + 1, BINS) if counts[b]]
        if not low or not high:
            continue
        n0, n1 = sum(n for _, n in low), sum(n for _, n in high)
        mean0 = Fraction(sum(b * n for b, n in low), n0)
        mean1 = Fraction(sum(b * n for b, n in high), n1)
        score = n0 * n1 * (mean0 - mean1) ** 2  # between-class variance times N^2
        if best_score is None or score > best_score:
            best_split, best_score = split, score
    return {c: b <= best_split for c, b in bins.items()}


def draw(weighted: list, greedy: bool, rng: np.random.Generator, ties=None):
    """Key of a [(key, weight)] list: the first maximum if greedy, else inverse CDF of one uniform."""
    if greedy:
        best = max(w for _, w in weighted)
        for _, w in weighted:
            if w != best:
                _note(ties, w, best, "argmax")
        return next(key for key, w in weighted if w == best)
    target = rng.random() * sum(w for _, w in weighted)
    running = 0.0
    for key, w in weighted:
        running += w
        if running > target:
            return key
    return [key for key, w in weighted if w > 0][-1]


def head1_weights(head: list[tuple[int, float]], generated, config: SamplingConfig) -> list:
    generated = {int(t) for t in generated}
    return [(t, p / (config.repetition_penalty if t in generated else 1.0)) for t, p in head]


def sample_ar(logits_row, generated, config: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from head 1 alone: top-k, temperature, repetition penalty."""
    head = candidates(logits_row, config.top_k, config.temperature or 1.0)
    return draw(head1_weights(head, generated, config), config.greedy, rng)


def ar_distribution(logits_row, generated, config: SamplingConfig) -> dict[int, float]:
    """{token: probability} that `sample_ar` draws from."""
    weights = head1_weights(
        candidates(logits_row, config.top_k, config.temperature or 1.0), generated, config
    )
    total = math.fsum(w for _, w in weights)
    return {t: w / total for t, w in weights}


def step(logits, generated, masks, config: SamplingConfig, rng: np.random.Generator, ties=None):
    """(tokens, backoffs) for one forward pass; logits is (n_heads, vocab) at the last position."""
    n_heads = len(logits)
    heads = [candidates(row, config.top_k, config.temperature or 1.0) for row in logits]
    for n in range(n_heads, 1, -1):
        grid = joint(heads[:n], generated, masks, config, ties)
        peak, bound = min(max(grid.values()), 1.0), config.eps_b ** (n - 1)
        _note(ties, peak, bound, "back-off bound")
        if peak > bound:
            cell = draw(list(grid.items()), config.greedy, rng, ties)
            return tuple(heads[i][cell[i]][0] for i in range(n)), n_heads - n
    return (draw(head1_weights(heads[0], generated, config), config.greedy, rng, ties),), n_heads - 1


def _note(ties, value: float, boundary: float, what: str, absolute: float = 0.0) -> None:
    """Record in `ties` that `value` sits within rounding of `boundary` (and is not exactly a zero)."""
    if ties is not None and boundary != 0 and abs(value - boundary) <= max(NEAR * abs(boundary), absolute):
        ties.append(f"{what}: {value!r} vs {boundary!r}")
