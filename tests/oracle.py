"""The test oracle: the decoding step written plainly, one function per stage of runtime/stages.py.

Written straight from docs/METHOD.md with loops over candidates, dicts, the whole
vocabulary where the fast path restricts itself to candidates, and exact rational
arithmetic where it is cheap; only tests use it. `ORACLE` and `VERIFY_ORACLE` are keyed
by the stage names and checked against the stage list, like the numpy and C paths.

    propose:   f_i = softmax(logits_i / T) over the vocabulary (T = 1 when greedy);
               C_i = head i's top_k tokens by (-logit, id)
    for n = n_heads .. 2, on the grid C_1 x ... x C_n (cells in C order):
      joint:     P(c) = f_1(c_1) * ... * f_n(c_n)
      weight:    J(c) = P(c) W(c) ** alpha_c * (sum P) / (sum P W ** alpha_c)   (redistribute, never create)
      static:    J(c) = 0 where J(c) < static_threshold
      adaptive:  B = J blurred (binomial kernel of size `blur`, mirrored borders), 256 equal
                 bins over [min B, max B], Otsu's split; J(c) = 0 in the low class
      penalty:   J(c) /= penalty ** (number of the c_i already generated or equal to an earlier c_j)
      backoff:   go on to n - 1 unless min(max J, 1) > eps_b ** (n - 1)
      draw:      the cell drawn from J (its argmax when greedy)
    n = 1: a token drawn from f_1(a) / penalty ** [a generated] over C_1

A draw uses one u = rng.random(): the first cell, in order, whose running sum exceeds
u * (sum of all weights).

Two correct implementations round differently in the last bits, so a decision taken
exactly at a boundary (a value on an Otsu bin edge, J at the static threshold or at the
back-off bound, two cells tied for the argmax) can go either way. Such boundaries do
occur: a blurred grid with two live cells can put a value exactly halfway between min
and max. Functions here take an optional `ties` list and record every decision within
rounding of its boundary, so a comparison can tell a real difference from a coin toss.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from runtime.config import SamplingConfig
from runtime.stages import DYNAMIC_STAGES, GRID_STAGES, VERIFY_STAGES, check_implements

BINS = 256
NEAR = 1e-9  # relative distance to a boundary that rounding could cross


@dataclass
class Context:
    """One step's inputs for the grid stages, and the list where near-ties are noted."""

    heads: list  # [[(token, f(token)), ...] per head], the grid's axes
    generated: set
    masks: object
    config: SamplingConfig
    ties: list | None = None
    bound: float = -math.inf
    product: dict = field(default_factory=dict)


def candidates(logits_row, top_k: int, temperature: float) -> list[tuple[int, float]]:
    """[(token, f(token))] for the top_k tokens by (-logit, id) under softmax(logits / temperature)."""
    logits = [float(x) for x in logits_row]
    top = max(logits)
    exps = [math.exp((x - top) / temperature) for x in logits]
    total = math.fsum(exps)
    ranked = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    return [(i, exps[i] / total) for i in ranked[:top_k]]


def propose(logits, config: SamplingConfig) -> list[list[tuple[int, float]]]:
    return [candidates(row, config.top_k, config.temperature or 1.0) for row in logits]


def joint(grid, ctx: Context) -> dict:
    cells = itertools.product(*(range(len(h)) for h in ctx.heads))
    ctx.product = {c: math.prod(ctx.heads[i][c[i]][1] for i in range(len(c))) for c in cells}
    return dict(ctx.product)


def weight(grid: dict, ctx: Context) -> dict:
    masks, config = ctx.masks, ctx.config
    if masks is None or config.alpha_c == 0 or len(ctx.heads) not in masks.orders:
        return grid
    weights = masks.weights([np.array([t for t, _ in h]) for h in ctx.heads])
    raw = {c: ctx.product[c] * float(weights[c]) ** config.alpha_c for c in grid}
    raw_total = math.fsum(raw.values())
    mass = math.fsum(ctx.product.values())
    return {c: (v * (mass / raw_total) if raw_total > 0 else 0.0) for c, v in raw.items()}


def static_threshold(grid: dict, ctx: Context) -> dict:
    for c in grid:
        _note(ctx.ties, grid[c], ctx.config.static_threshold, "static threshold")
        if grid[c] < ctx.config.static_threshold:
            grid[c] = 0.0
    return grid


def adaptive_threshold(grid: dict, ctx: Context) -> dict:
    if not ctx.config.adaptive:
        return grid
    low = otsu_low_class(blur(grid, [len(h) for h in ctx.heads], ctx.config.blur), ctx.ties)
    return {c: 0.0 if low[c] else v for c, v in grid.items()}


def penalty(grid: dict, ctx: Context) -> dict:
    out = {}
    for c, v in grid.items():
        tokens = [ctx.heads[i][c[i]][0] for i in range(len(c))]
        repeats = sum(t in ctx.generated or t in tokens[:i] for i, t in enumerate(tokens))
        out[c] = v / ctx.config.repetition_penalty**repeats
    return out


def backoff(grid: dict, ctx: Context) -> dict | None:
    peak = min(max(grid.values()), 1.0)
    _note(ctx.ties, peak, ctx.bound, "back-off bound")
    return grid if peak > ctx.bound else None


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


ORACLE = {
    "propose": propose,
    "joint": joint,
    "weight": weight,
    "static_threshold": static_threshold,
    "adaptive_threshold": adaptive_threshold,
    "penalty": penalty,
    "backoff": backoff,
    "draw": draw,
}
check_implements("tests/oracle.py", ORACLE, DYNAMIC_STAGES)


def grid_joint(heads, generated, masks, config: SamplingConfig, ties=None, bound=-math.inf) -> dict | None:
    """The grid stages of Algorithm 1 in order over the candidates `heads`; None if it backs off."""
    ctx = Context(heads, {int(t) for t in generated}, masks, config, ties, bound)
    grid: dict | None = {}
    for name in GRID_STAGES:
        grid = ORACLE[name](grid, ctx)
        if grid is None:
            return None
    return grid


def step(logits, generated, masks, config: SamplingConfig, rng: np.random.Generator, ties=None):
    """(tokens, backoffs) for one forward pass; logits is (n_heads, vocab) at the last position."""
    n_heads = len(logits)
    heads = ORACLE["propose"](logits, config)
    for n in range(n_heads, 1, -1):
        grid = grid_joint(heads[:n], generated, masks, config, ties, config.eps_b ** (n - 1))
        if grid is not None:
            cell = ORACLE["draw"](list(grid.items()), config.greedy, rng, ties)
            return tuple(heads[i][cell[i]][0] for i in range(n)), n_heads - n
    return (draw(head1_weights(heads[0], generated, config), config.greedy, rng, ties),), n_heads - 1


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


# --- verify -----------------------------------------------------------------------------------


def draft(logits_row, prefix: list[int], generated, masks, config: SamplingConfig) -> dict[int, float]:
    """{token: q(token)} of the draft after `prefix` (the tokens since the position the draft
    head reads: head 1's choice, then the earlier drafts), over the whole vocabulary.

    q(c) = f(c) W(s, c) ** alpha_c / penalty ** [c generated] over the head's top-k, normalised,
    with s the longest suffix of `prefix` (at most order - 1 tokens) whose n-gram rows hold an
    entry for a candidate; the marginal where none does or alpha_c = 0. Tokens outside the
    top-k get 0.
    """
    head = candidates(logits_row, config.top_k, config.temperature or 1.0)
    seen = {int(t) for t in generated} | set(prefix)
    factor = dict.fromkeys((t for t, _ in head), 1.0)
    if masks is not None and config.alpha_c > 0:
        for length in range(min(len(prefix), max(masks.orders) - 1), 0, -1):
            if length + 1 not in masks.orders:
                continue
            context = prefix[-length:]
            found = {t: _weight(masks, [*context, t]) for t, _ in head}
            if any(w > 0 for w in found.values()):
                factor = {t: w**config.alpha_c for t, w in found.items()}
                break
    weights = {t: p * factor[t] / (config.repetition_penalty if t in seen else 1.0) for t, p in head}
    total = math.fsum(weights.values())
    vocab = len(logits_row)
    return {t: weights.get(t, 0.0) / total for t in range(vocab)}


def _weight(masks, ngram: list[int]) -> float:
    return float(masks.weights([np.array([t]) for t in ngram]).reshape(-1)[0])


def check(p: dict[int, float], q: dict[int, float], token: int) -> float:
    """The probability that a draft `token` drawn from q is accepted against the target p."""
    return min(1.0, p.get(token, 0.0) / q[token])


def residual(p: dict[int, float], q: dict[int, float]) -> dict[int, float]:
    """norm(max(0, p - q)) over the union of both supports (p where nothing is left)."""
    left = {t: max(0.0, p.get(t, 0.0) - q.get(t, 0.0)) for t in set(p) | set(q)}
    total = math.fsum(left.values())
    if total == 0:
        return dict(p)
    return {t: v / total for t, v in left.items()}


VERIFY_ORACLE = {"draft": draft, "check": check, "residual": residual}
check_implements("tests/oracle.py", VERIFY_ORACLE, VERIFY_STAGES)


def _note(ties, value: float, boundary: float, what: str, absolute: float = 0.0) -> None:
    """Record in `ties` that `value` sits within rounding of `boundary` (and is not exactly a zero)."""
    if (
        ties is not None
        and boundary != 0
        and math.isfinite(boundary)
        and abs(value - boundary) <= max(NEAR * abs(boundary), absolute)
    ):
        ties.append(f"{what}: {value!r} vs {boundary!r}")
