"""The candidate-grid lookup of co-occurrence weights W that the decoding loop calls every step.

DynaMo corrects the product of the heads' marginals with W(a,b) = p(a,b) / (p(a) p(b))
and W(a,b,c) = p(a,b,c) / (p(a) p(b) p(c)), counted on the training corpus
(dynamo_export/cooccurrence.py defines the p^ exactly); an n-gram that was never seen,
or seen fewer than `min_count` times, has W = 0. runtime/cooccurrence_file.py holds the
format on disk (pairs.npz, triples.npz whose rows are the stored pairs) and validates it.

Lookup: each matrix keeps its CSR arrays, a sorted int64 key array (row * ncols + col)
and a float32 value array ending in 0, so entry id -1 ("not stored") reads as W = 0.
A grid lookup finds the entry ids of all its cells at once, with no Python loop over
candidates. A pair grid binary-searches its k rows (mostly frequent tokens with long
rows) for the k sorted candidates: one np.searchsorted of k*k keys. A triple grid first
finds its k*k pair entry ids and drops the pairs that start no stored triple (over 70%
of the cells on real data at k = 50); the surviving pairs' triple rows are mostly short,
so rows of at most 4*k entries are scanned whole against a token -> column map (cost ~
their length) and only longer ones are binary-searched; only the stored triples found are
written into the zeroed grid. The last pair grid's entry ids are kept: a sampler step that
backs off from n = 3 to n = 2 asks for the pairs of the same candidates again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from runtime.cooccurrence_file import (
    INDEX_DTYPE,
    VALUE_DTYPE,
    CooccurrenceMeta,
    CsrArrays,
    load_cooccurrence,
    save_cooccurrence,
)
from runtime.errors import InputError
from runtime.native import CsrTables

__all__ = ["CooccurrenceMask", "load_cooccurrence", "save_cooccurrence"]

_INT64_MAX = np.iinfo(np.int64).max


# With scan_short_rows, a row is scanned rather than binary-searched when it holds at most this
# many entries per candidate column: one searchsorted probe costs about as much as scanning 4-8.
_SCAN_ROW_FACTOR = 4


class CooccurrenceMask:
    """W lookups over candidate grids: `mask.weights([ids_1, ids_2])` -> (k1, k2) float32, 0 for unseen."""

    def __init__(self, meta: CooccurrenceMeta, matrices: Mapping[int, CsrArrays]):
        self.meta = meta
        self.vocab_size = meta.vocab_size
        self.orders = meta.orders
        self._pairs = _Table(matrices[2])
        if 3 in self.orders:
            self._triples = _Table(matrices[3])
            # (P + 1,) bool: does pair entry r start any stored triple? The last slot answers for entry -1.
            self._pair_has_triples = np.append(np.diff(matrices[3].indptr) > 0, False)
        # The last pair grid's ids and entry ids. A sampler step that backs off from n = 3 to 2
        # asks for the pairs of the same two candidate lists twice; one tuple, replaced whole,
        # so a thread sharing the mask sees a stale entry only as a miss.
        self._last_pairs: tuple[bytes, bytes, np.ndarray] | None = None
        self._csr_tables: CsrTables | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_vocab_size: int | None = None,
        max_bytes: int | None = None,
        contents: Mapping[str, bytes] | None = None,
    ) -> CooccurrenceMask:
        """Load and validate a co-occurrence directory; `expected_vocab_size` is the model's vocabulary,
        `max_bytes` a cap on what the declared sizes may take once loaded, `contents` its files'
        bytes when the artifact loader read them already (then no file is opened)."""
        return cls(*load_cooccurrence(path, expected_vocab_size, max_bytes, contents))

    def weights(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """W over the grid of candidates: 2 id arrays -> (k1, k2), 3 -> (k1, k2, k3), float32."""
        cells, values = self.hits(ids)
        grid = np.zeros(tuple(np.asarray(x).size for x in ids), dtype=VALUE_DTYPE)
        grid.reshape(-1)[cells] = values
        return grid

    def hits(self, ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The stored n-grams of the candidate grid: (flat C-order cell ids, ascending; W there, float32).

        The sampler's form: a 50**3 grid holds a few thousand stored triples, and work on
        those alone is what keeps a sampling step cheap next to a forward pass.
        """
        if len(ids) not in self.orders:
            raise InputError(
                f"lookups take one id array per position for orders {self.orders}, got {len(ids)}"
            )
        first, second, *third = [self._ids(x) for x in ids]
        pairs = self._pair_entries(first, second).reshape(-1)  # (k1 * k2,) pair entry ids, -1 if unseen
        if not third:
            cells = np.flatnonzero(pairs >= 0)
            return cells, self._pairs.values[pairs[cells]]
        third = third[0]
        uniq, inverse = np.unique(third, return_inverse=True)
        if uniq.size < third.size:  # repeated candidates: look each one up once (top-k never repeats)
            grid = self._triple_grid(pairs, uniq)[:, inverse].reshape(-1)
            cells = np.flatnonzero(grid)
            return cells, grid[cells]
        row, col, values = self._stored_triples(pairs, third)
        cells = row * third.size + col
        order = np.argsort(cells)
        return cells[order], values[order]

    def csr_tables(self) -> CsrTables:
        """The CSR arrays behind the lookups, as the compiled sampler reads them (built once: it asks
        every pass). Column indices are narrowed to uint16 where the vocabulary fits (Pythia's 50k
        does): the kernel scans ~35k of them a step, and half the bytes is a third fewer cache misses.
        """
        if self._csr_tables is None:
            narrow = np.uint16 if self.vocab_size <= 1 << 16 else INDEX_DTYPE
            if 3 in self.orders:
                triples = (
                    self._triples.indptr,
                    self._triples.indices.astype(narrow),
                    self._triples.values[:-1],
                )
            else:
                triples = (np.zeros(1, dtype=np.int64), np.empty(0, narrow), np.empty(0, VALUE_DTYPE))
            self._csr_tables = CsrTables(
                self._pairs.indptr, self._pairs.indices.astype(narrow), self._pairs.values[:-1], *triples
            )
        return self._csr_tables

    def triple_weights_for_pairs(
        self, first: np.ndarray, second: np.ndarray, third: np.ndarray
    ) -> np.ndarray:
        """W(first[i], second[i], third[j]) -> (m, k) float32: the triples of m given pairs only."""
        if 3 not in self.orders:
            raise InputError(f"this co-occurrence file holds orders {self.orders}, no triples")
        first, second, third = self._ids(first), self._ids(second), self._ids(third)
        if first.size != second.size:
            raise InputError(
                f"first and second must pair up one to one; got {first.size} and {second.size} ids"
            )
        q = first * self.vocab_size + second  # (m,)
        pairs = np.searchsorted(self._pairs.keys, q)
        pairs[self._pairs.keys[pairs] != q] = -1
        return self._triple_grid(pairs, third)

    def _pair_entries(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(k1, k2) pair entry ids of int64 id arrays (read-only: the cache keeps them), the
        previous call's answer if it asked for the same ids."""
        key = (first.tobytes(), second.tobytes())
        last = self._last_pairs
        if last is not None and last[:2] == key:
            return last[2]
        # k rows, mostly frequent tokens with long rows: binary search all of them.
        pairs = self._pairs.entries(first, second)
        pairs.setflags(write=False)
        self._last_pairs = (*key, pairs)
        return pairs

    def _triple_grid(self, pairs: np.ndarray, third: np.ndarray) -> np.ndarray:
        """(pairs.size, k) W(pair, third[j]) for pair entry ids (-1: unseen pair)."""
        out = np.zeros((pairs.size, third.size), dtype=VALUE_DTYPE)
        uniq, inverse = np.unique(third, return_inverse=True)
        if uniq.size < third.size:  # repeated candidates: look each one up once
            return self._triple_grid(pairs, uniq)[:, inverse]
        row, col, values = self._stored_triples(pairs, third)
        out[row, col] = values
        return out

    def _stored_triples(
        self, pairs: np.ndarray, third: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, W) of every stored triple (pair i, third[j]); `third` must be distinct."""
        live = np.flatnonzero(self._pair_has_triples[pairs])  # most candidate pairs drop out here
        if not live.size or not third.size:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=VALUE_DTYPE)
        # Only the stored triples are gathered: a grid of entry ids would be mostly -1 and
        # cost more to build, reorder and gather through than the hits themselves.
        row, col, entry = self._triples.hits(pairs[live], third)
        return live[row], col, self._triples.values[entry]

    def _ids(self, x) -> np.ndarray:
        ids = np.asarray(x)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InputError(f"token ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(
                f"token ids span [{ids.min()}, {ids.max()}], outside the vocabulary [0, {self.vocab_size})"
            )
        return ids.astype(np.int64, copy=False)


class _Table:
    """One CSR matrix arranged for grid lookups of stored-entry ids.

    `values` ends with a 0 so that entry id -1 (not stored) reads as W = 0, and `keys`
    (row * ncols + col, the global sort order) ends with INT64_MAX so searchsorted
    never runs off the end.
    """

    def __init__(self, csr: CsrArrays):
        self.indptr = csr.indptr.astype(np.int64)
        self.indices = csr.indices
        self.ncols = csr.shape[1]
        self.keys = np.append(csr.keys, _INT64_MAX)
        self.values = np.append(csr.data, VALUE_DTYPE.type(0))

    def entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(rows.size, cols.size) int64: the entry id of (rows[i], cols[j]), -1 where nothing is stored.

        Rows are binary-searched for the columns (cost ~ k log nnz per row), the columns
        sorted so that searchsorted walks the keys forwards (1.7x faster than random order).
        """
        order = np.argsort(cols)
        uniq = cols[order]
        if np.any(uniq[1:] == uniq[:-1]):  # repeated candidates: look each one up once
            uniq, inverse = np.unique(cols, return_inverse=True)
            return self.entries(rows, uniq)[:, inverse]
        return self._search(rows, uniq)[:, np.argsort(order)]

    def hits(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored cells of the grid rows x cols, as (i, j, entry id) arrays; `cols` must be distinct.

        For up to k*k rows, most of them short: rows of at most _SCAN_ROW_FACTOR * k
        entries are scanned whole against a token -> column map (cost ~ their length),
        the rest binary-searched as in `entries`.
        """
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        short = lengths <= _SCAN_ROW_FACTOR * cols.size
        scanned = self._scan(np.flatnonzero(short), starts[short], lengths[short], cols)
        long_rows = np.flatnonzero(~short)
        order = np.argsort(cols)
        found = self._search(rows[long_rows], cols[order])
        i, j = np.nonzero(found >= 0)
        searched = (long_rows[i], order[j], found[i, j])
        return tuple(np.concatenate(parts) for parts in zip(scanned, searched, strict=True))

    def _search(self, rows: np.ndarray, uniq: np.ndarray) -> np.ndarray:
        q = rows[:, None] * self.ncols + uniq  # (rows, k), ascending within each row
        pos = np.searchsorted(self.keys, q)
        pos[self.keys[pos] != q] = -1
        return pos

    def _scan(
        self, which: np.ndarray, starts: np.ndarray, lengths: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(which[i], j, entry id) of every stored (row, cols[j]), reading each row's entries once."""
        nonempty = lengths > 0
        which, starts, lengths = which[nonempty], starts[nonempty], lengths[nonempty]
        if not which.size:
            return which, which, which
        column = np.full(self.ncols, -1, dtype=np.int64)  # token -> its position in cols
        column[cols] = np.arange(cols.size)
        offsets = np.cumsum(lengths) - lengths  # (n,) where each row begins in the concatenation
        # (L,) entry ids: runs starts[i], starts[i] + 1, ... as one cumsum of steps that jump to
        # the next row's start where its run begins (np.repeat of per-row shifts costs more).
        step = np.ones(int(offsets[-1] + lengths[-1]), dtype=np.int64)
        step[0] = starts[0]
        step[offsets[1:]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
        entry = np.cumsum(step)
        col = column[self.indices[entry]]
        hit = np.flatnonzero(col >= 0)
        row = np.searchsorted(offsets, hit, side="right") - 1
        return which[row], col[hit], entry[hit]
