"""The `draw` stage: one cell of a grid, or one token of a head, from one uniform number.

Every random draw is one u = rng.random(), turned into a cell by inverse CDF in C
order: the first cell whose running sum exceeds u * (sum of the weights). Greedy
takes the first maximal cell and draws nothing. The compiled kernel draws the same
way through the same rng.random, so both paths consume the same random numbers.
"""

from __future__ import annotations

import numpy as np

from runtime.config import SamplingConfig
from runtime.errors import SamplingError
from runtime.marginals import TopK, head_topk
from runtime.tokensets import Generated, TokenSet, token_set


def draw(weights: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    """Flat index of a cell: argmax if greedy, else inverse CDF of one rng.random() in C order.

    A 1-D array (a head's top-k) is drawn with one running sum, the oracle's draw to
    the last bit. A grid goes in two levels (sums of the slices along the first axis, then
    one slice) so a 50**3 grid is not cumsummed whole; the cell is the same as one running
    sum over the grid up to rounding.
    """
    if weights.ndim == 1:
        return draw_sequential(weights, greedy, rng)
    flat = weights.reshape(-1)
    if greedy:
        return int(np.argmax(flat))
    rows = flat.reshape(weights.shape[0], -1)  # (k_1, cells / k_1): few long rows
    width = rows.shape[1]
    row_cdf = np.cumsum(rows.sum(axis=1))
    target = rng.random() * row_cdf[-1]
    r = first_above(row_cdf, target)
    row_target = target - (row_cdf[r - 1] if r > 0 else 0.0)
    return r * width + first_above(np.cumsum(rows[r]), row_target)


def draw_sequential(weights: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    """A draw over a 1-D array with one running sum: the oracle's draw, rounding included."""
    if greedy:
        return int(np.argmax(weights))
    cdf = np.cumsum(weights)
    return first_above(cdf, rng.random() * cdf[-1])


def first_above(cdf: np.ndarray, target: float) -> int:
    """First index with cdf > target; the last step of positive mass if rounding leaves none."""
    i = int(np.searchsorted(cdf, target, side="right"))
    if i < cdf.size:
        return i
    return int(np.flatnonzero(np.diff(cdf, prepend=0.0) > 0)[-1])


def penalised(top: TopK, generated: TokenSet, config: SamplingConfig) -> np.ndarray:
    """A head's top-k probabilities with those of generated tokens divided by the penalty."""
    if config.repetition_penalty == 1 or not generated.any:
        return top.probs
    return top.probs / np.where(generated.contains(top.ids), config.repetition_penalty, 1.0)


def draw_head1(top: TopK, generated: TokenSet, config: SamplingConfig, rng: np.random.Generator) -> int:
    """One token of head 1 alone (top-k, penalty): `ar` mode, and n = 1 of Algorithm 1."""
    return int(top.ids[draw(penalised(top, generated, config), config.greedy, rng)])


def sample_ar(
    logits_head1: np.ndarray, generated: Generated, config: SamplingConfig, rng: np.random.Generator
) -> int:
    """One token from head 1 (top-k, temperature, repetition penalty): `ar` mode."""
    row = np.asarray(logits_head1)
    if row.ndim != 1 or row.size == 0:
        raise SamplingError(f"head-1 logits must be a non-empty (vocab,) array, got shape {row.shape}")
    top = head_topk(row, config.top_k, config.temperature or 1.0)
    return draw_head1(top, token_set(generated), config, rng)
