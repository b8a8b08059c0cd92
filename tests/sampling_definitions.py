"""Shared by the sampler tests: co-occurrence stand-ins and Algorithm 1's joint written as plain
whole-grid numpy and scipy, the definition the fast sampler (numpy or compiled) is held to."""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.ndimage import correlate1d

from runtime.cooccurrence import CooccurrenceMask, save_cooccurrence


class DenseMasks:
    """Co-occurrence weights backed by dense (V, V) and (V, V, V) arrays."""

    def __init__(self, pair: np.ndarray, triple: np.ndarray | None = None) -> None:
        self.tables = {2: pair} if triple is None else {2: pair, 3: triple}
        self.orders = tuple(self.tables)

    def weights(self, ids):
        return self.tables[len(ids)][np.ix_(*ids)].astype(np.float32)  # stored as the real masks are

    def hits(self, ids):
        grid = self.weights(ids).reshape(-1)
        cells = np.flatnonzero(grid)
        return cells, grid[cells]


def random_masks(rng: np.random.Generator, vocab: int, density: float) -> DenseMasks:
    def table(shape):
        return (rng.random(shape) < density) * rng.uniform(0.1, 5.0, shape)

    return DenseMasks(table((vocab, vocab)), table((vocab, vocab, vocab)))


def csr_masks(dense: DenseMasks, directory: Path) -> CooccurrenceMask:
    """The same weights as the runtime's CSR co-occurrence files (saved, then loaded back)."""
    vocab = dense.tables[2].shape[0]
    weights = {}
    for n, table in dense.tables.items():
        if n == 3:
            table = table * (dense.tables[2][:, :, None] > 0)  # a seen triple's prefix pair is seen
        keys = np.flatnonzero(table)  # base-V codes in C order = strictly increasing
        weights[n] = (keys.astype(np.int64), table.ravel()[keys].astype(np.float32))
    save_cooccurrence(
        directory,
        vocab_size=vocab,
        num_tokens=1000,
        ngram_positions={n: 1000 - n + 1 for n in weights},
        min_count=1,
        eot_id=0,
        weights=weights,
    )
    return CooccurrenceMask.load(directory, expected_vocab_size=vocab)


def outer(vectors):
    """v_1 (x) v_2 (x) ... as ((v_1 * v_2) * v_3) ..."""
    return functools.reduce(np.multiply, np.ix_(*vectors))


def whole_grid_joint(topks, generated, masks, config):
    """J of Algorithm 1 computed on every cell: scipy's blur, all cells binned, exact Otsu split."""
    grid = outer([t.probs for t in topks])
    if masks is not None and config.alpha_c > 0 and len(topks) in masks.orders:
        weights = masks.weights([t.ids for t in topks])
        if config.alpha_c != 1:
            weights = np.power(weights, config.alpha_c, dtype=np.float64)
        mass = np.prod([np.cumsum(t.probs)[-1] for t in topks])  # each top-k mass a running sum
        grid = grid * weights
        total = np.cumsum(grid)[-1]  # the running sum in C order
        if total > 0:
            grid *= mass / total
    grid[grid < config.static_threshold] = 0.0
    if config.adaptive:
        blurred = grid
        if config.blur > 1:
            kernel = np.array([math.comb(config.blur - 1, j) for j in range(config.blur)]) / 2.0 ** (
                config.blur - 1
            )
            for axis in range(grid.ndim):
                blurred = correlate1d(blurred, kernel, axis=axis, mode="mirror")
        lo, hi = blurred.min(), blurred.max()
        if hi > lo:
            bins = np.minimum(((blurred - lo) * (256 / (hi - lo))).astype(np.int64), 255)
            grid[bins <= exact_otsu_split(np.bincount(bins.ravel(), minlength=256))] = 0.0
    # once per axis whose candidate was generated or equals an earlier axis' candidate in the cell
    ids = np.ix_(*[t.ids for t in topks])
    for axis in range(grid.ndim):
        repeated = np.isin(ids[axis], np.asarray(generated))
        for earlier in range(axis):
            repeated = repeated | (ids[earlier] == ids[axis])
        if config.repetition_penalty != 1:
            grid /= np.where(repeated, config.repetition_penalty, 1.0)
    return grid


def exact_otsu_split(counts):
    """First split maximising n0 * n1 * (mu0 - mu1)^2, in exact rationals over the occupied bins."""
    best, best_score = None, None
    occupied = [b for b in range(len(counts)) if counts[b]]
    for split in occupied[:-1]:  # a split inside a gap ties with the gap's first one
        low = [(b, int(counts[b])) for b in occupied if b <= split]
        high = [(b, int(counts[b])) for b in occupied if b > split]
        n0, n1 = sum(n for _, n in low), sum(n for _, n in high)
        mean0 = Fraction(sum(b * n for b, n in low), n0)
        mean1 = Fraction(sum(b * n for b, n in high), n1)
        score = n0 * n1 * (mean0 - mean1) ** 2
        if best_score is None or score > best_score:
            best, best_score = split, score
    return best


class FakeModel:
    """Logits of every head as a fixed random function of the prefix (a stand-in for a network)."""

    def __init__(self, vocab: int, n_heads: int, seed: int, scale: float = 2.0) -> None:
        self.vocab, self.n_heads, self.seed, self.scale = vocab, n_heads, seed, scale
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, prefix) -> np.ndarray:
        key = tuple(int(t) for t in prefix)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, len(key), *key])
            logits = rng.normal(size=(self.n_heads, self.vocab)) * self.scale
            for head in range(self.n_heads):  # head i leans to last + i: drafts get accepted sometimes
                logits[head, (key[-1] + head + 1) % self.vocab] += 2.0
            self._cache[key] = logits.astype(np.float32)
        return self._cache[key]
