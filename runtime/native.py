"""The compiled sampler kernel (runtime/_native.c) behind numpy-shaped calls: a whole weighted
dynamic step, the weighted joint alone, and the top-k search.

`pip install` builds the C file as an optional extension: where no compiler is at
hand the install still succeeds, `AVAILABLE` is False, and the sampler keeps to its
numpy path, which computes the very same numbers (tests/test_native.py holds the two
equal bit for bit, and both to the whole-grid definition). DYNAMO_NATIVE=0 in the
environment turns the kernel off.

The kernel covers the paper's defaults and their neighbours: co-occurrence weights
with alpha_c = 1 over 2- or 3-token grids, any static threshold, Otsu on or off, blur
0, 1 or 3. Anything else (alpha_c != 1 needs numpy's pow, wider blurs scipy's
correlate1d rounding) goes the numpy way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from runtime.config import SamplingConfig

if os.environ.get("DYNAMO_NATIVE", "1") == "0":  # opt out, e.g. to compare the two paths
    _native = None
else:
    try:
        from runtime import _native
    except ImportError:  # built without a C compiler: the numpy path serves
        _native = None

AVAILABLE = _native is not None
# Grids above this many cells (top_k > 128 at three heads) take the numpy path: the
# kernel's scratch is 8 words and a byte per cell.
MAX_CELLS = 1 << 21


class CsrTables(NamedTuple):
    """The co-occurrence CSR arrays the kernel reads (pair rows = tokens, triple rows = pair entries)."""

    pair_indptr: np.ndarray  # (V + 1,) int64
    pair_indices: np.ndarray  # (P,) int32
    pair_values: np.ndarray  # (P,) float32
    triple_indptr: np.ndarray  # (P + 1,) int64, or (1,) without triples
    triple_indices: np.ndarray  # (T,) int32
    triple_values: np.ndarray  # (T,) float32


def supports_step(masks, config: SamplingConfig, n_heads: int, k: int) -> bool:
    """Whether one kernel call can do a whole step: weights at every n >= 2, within `supports`."""
    return (
        n_heads >= 2
        and hasattr(masks, "csr_tables")
        and all(
            n in masks.orders and supports(n, k**n, config.alpha_c, config.adaptive, config.blur)
            for n in range(2, n_heads + 1)
        )
    )


def supports(order: int, cells: int, alpha_c: float, adaptive: bool, blur: int) -> bool:
    """Whether the kernel computes this joint (else the numpy path does)."""
    return (
        AVAILABLE
        and order in (2, 3)
        and cells <= MAX_CELLS
        and alpha_c == 1
        and (not adaptive or blur in (0, 1, 3))
    )


def topk_ids(
    logits: np.ndarray, k: int, weights: np.ndarray, totals: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's k best ids by (-logit, id), (rows, k) int64, and weights[id] / totals[row] there,
    (rows, k) float64, for (rows, vocab) `weights` and (rows,) `totals` in C order; None where
    the kernel does not apply (logits not float32 rows of unit stride).

    Only the search is compiled: numpy's own softmax (exp, division) runs on every AVX-512
    lane the machine has, which a portable build of the kernel cannot assume.
    """
    assert _native is not None
    rows, vocab = logits.shape
    item = logits.itemsize
    if (
        logits.dtype != np.float32
        or logits.strides[1] != item
        or logits.strides[0] % item
        or logits.strides[0] < 0
    ):
        return None
    if logits.flags.c_contiguous:
        span, row_stride = logits.reshape(-1), vocab
    else:  # e.g. logits[:, -1] of a (heads, T, vocab) output: the rows as one span, gaps included
        row_stride = logits.strides[0] // item
        span = np.lib.stride_tricks.as_strided(
            logits, shape=((rows - 1) * row_stride + vocab,), strides=(item,)
        )
    ids = np.empty((rows, k), dtype=np.int64)
    probs = np.empty((rows, k), dtype=np.float64)
    _native.select(span, rows, vocab, row_stride, k, weights, totals, ids, probs)
    return ids, probs


class NativeSampler:
    """The kernel's scratch for one sampler (not thread-safe, like the sampler itself)."""

    def __init__(self) -> None:
        self._rank = np.empty(0, dtype=np.int32)
        self._cells = np.empty(0, dtype=np.int64)
        self._values = np.empty(0, dtype=np.float64)
        self._work = np.empty(0, dtype=np.float64)  # (3 * cells,): a zero grid, then two pass grids
        self._iwork = np.empty(0, dtype=np.int64)  # (5 * cells,): cell lists
        self._flags = np.empty(0, dtype=np.uint8)  # (cells,): all 0 between calls
        self._pair_grid = np.empty(0, dtype=np.int64)  # (k1 * k2,): pair entry ids of the last call
        self._pair_key: tuple[bytes, bytes] | None = None  # its first two id lists ...
        self._pair_table: np.ndarray | None = None  # ... and pair table (held: an id could be reused)

    def joint(
        self,
        ids: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        tables: CsrTables,
        mass: float,
        bound: float,
        static_threshold: float,
        adaptive: bool,
        blur: int,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(ascending cell ids, J there) after weighting, static threshold and Otsu; None if
        min(max J, 1) <= bound once weighted (the numpy path's early back-off).

        `ids` must be distinct within each axis (top-k lists are).
        """
        assert _native is not None
        shape = tuple(int(x.size) for x in ids)
        reuse = self._prepare(math.prod(shape), ids[0], ids[1], tables)
        count = _native.joint(
            shape,
            np.concatenate(ids).astype(np.int64, copy=False),
            np.concatenate(probs).astype(np.float64, copy=False),
            *tables,
            self._rank,
            float(mass),
            float(bound),
            float(static_threshold),
            int(adaptive),
            int(blur),
            *self._scratch(),
            int(reuse),
        )
        self._pair_key, self._pair_table = (ids[0].tobytes(), ids[1].tobytes()), tables.pair_indices
        if count < 0:
            return None
        return self._cells[:count].copy(), self._values[:count].copy()

    def step(
        self,
        ids: np.ndarray,
        probs: np.ndarray,
        seen: np.ndarray,
        tables: CsrTables,
        config: SamplingConfig,
        rng: np.random.Generator,
    ) -> tuple[int, ...]:
        """The tokens one pass emits: DynamicSampler.step with co-occurrence weights at every n
        (`supports_step`), in one call. ids / probs (n, k) are the heads' top-k, seen (n, k)
        bool marks the generated ones.
        """
        assert _native is not None
        n, k = ids.shape
        # As the numpy path computes them: each head's top-k mass, multiplied head by head.
        sums = probs.sum(axis=1).tolist()
        masses = np.array([math.prod(sums[:m]) for m in range(n + 1)])
        bounds = np.array([config.eps_b ** (m - 1) if m else 0.0 for m in range(n + 1)])
        reuse = self._prepare(k**n, ids[0], ids[1], tables)
        tokens, pairs_ready = _native.step(
            ids,
            probs,
            seen.view(np.uint8),
            masses,
            bounds,
            n,
            k,
            *tables,
            self._rank,
            float(config.static_threshold),
            float(config.repetition_penalty),
            int(config.adaptive),
            int(config.blur),
            int(config.greedy),
            rng.random,
            *self._scratch(),
            int(reuse),
        )
        if pairs_ready:  # a step whose every joint was skipped computed no pairs
            self._pair_key, self._pair_table = (ids[0].tobytes(), ids[1].tobytes()), tables.pair_indices
        return tokens

    def _prepare(self, size: int, first: np.ndarray, second: np.ndarray, tables: CsrTables) -> bool:
        """Grow the scratch to a grid of `size` cells; whether the last call's pair grid fits these ids."""
        vocab = tables.pair_indptr.size - 1
        if self._rank.size != vocab:
            self._rank = np.full(vocab, -1, dtype=np.int32)  # the kernel restores every slot it sets
        if self._cells.size < size:
            self._cells = np.empty(size, dtype=np.int64)
            self._values = np.empty(size, dtype=np.float64)
            self._work = np.zeros(3 * size, dtype=np.float64)
            self._iwork = np.empty(5 * size, dtype=np.int64)
            self._flags = np.zeros(size, dtype=np.uint8)
        if self._pair_grid.size < first.size * second.size:
            self._pair_grid = np.empty(first.size * second.size, dtype=np.int64)
            self._pair_key = None
        reuse = (
            first.tobytes(),
            second.tobytes(),
        ) == self._pair_key and tables.pair_indices is self._pair_table
        self._pair_key = None  # until the coming call succeeds
        return reuse

    def _scratch(self) -> tuple[np.ndarray, ...]:
        return self._cells, self._values, self._work, self._iwork, self._flags, self._pair_grid
