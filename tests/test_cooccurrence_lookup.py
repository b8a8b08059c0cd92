"""The grid lookup's fast paths (sparse triple hits, the pair-grid cache) against dense tables, exactly."""

from __future__ import annotations

import numpy as np
import pytest

import runtime.cooccurrence as rc
from runtime import CooccurrenceMask

VOCAB = 40
LONG_PAIR = (1, 2)  # every third token follows it: a row longer than 4 * k for small grids
BARE_PAIR = (3, 4)  # a stored pair that starts no stored triple: an empty triple row


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A saved mask directory and its dense float32 references, with long, short and empty triple rows."""
    rng = np.random.default_rng(0)
    dense2 = np.where(rng.random((VOCAB, VOCAB)) < 0.3, rng.uniform(0.5, 1e4, (VOCAB, VOCAB)), 0)
    dense2[LONG_PAIR] = dense2[BARE_PAIR] = 7.0
    # A triple needs its prefix pair stored (the format's rule, from count(a,b) >= count(a,b,c)).
    dense3 = np.where(
        (dense2[:, :, None] > 0) & (rng.random((VOCAB,) * 3) < 0.2), rng.uniform(0.5, 1e6, (VOCAB,) * 3), 0
    )
    dense3[LONG_PAIR] = rng.uniform(0.5, 1e6, VOCAB)
    dense3[BARE_PAIR] = 0
    weights = {}
    for n, dense in ((2, dense2), (3, dense3)):
        keys = np.flatnonzero(dense).astype(np.int64)  # C order = base-V codes, ascending
        weights[n] = (keys, dense.reshape(-1)[keys])
    out = tmp_path_factory.mktemp("lookup") / "mask"
    rc.save_cooccurrence(
        out,
        vocab_size=VOCAB,
        num_tokens=1000,
        ngram_positions={2: 999, 3: 998},
        min_count=1,
        eot_id=0,
        weights=weights,
    )
    return out, dense2.astype(np.float32), dense3.astype(np.float32)


@pytest.mark.parametrize("scan_factor", [0, 1, 10**9], ids=["search-all", "mixed", "scan-all"])
def test_triple_grid_holds_exactly_the_stored_triples(table, monkeypatch, scan_factor):
    monkeypatch.setattr(rc, "_SCAN_ROW_FACTOR", scan_factor)
    path, _, dense3 = table
    mask = CooccurrenceMask.load(path)
    rng = np.random.default_rng(scan_factor)
    fixed = [(np.array([1, 3, 1]), np.array([2, 4, 2]), np.array([5, 5, 9, 0]))]  # long/empty rows, repeats
    sizes = [(9, 13, 6), (30, 30, 30), (1, 1, 1), (4, 5, 0)]
    random = [tuple(rng.integers(0, VOCAB, n) for n in ks) for ks in sizes]
    for a, b, c in fixed + random:
        grid = mask.weights([a, b, c])
        assert grid.dtype == np.float32
        np.testing.assert_array_equal(grid, dense3[np.ix_(a, b, c)])
        np.testing.assert_array_equal(
            mask.triple_weights_for_pairs(a, a, c), dense3[a[:, None], a[:, None], c[None, :]]
        )
    whole = mask.weights([np.arange(VOCAB)] * 3)
    np.testing.assert_array_equal(whole, dense3)
    assert 0 < np.count_nonzero(whole) < whole.size


def test_hits_skip_empty_rows_and_find_long_ones(table):
    """`_Table.hits` on triple rows of every kind, the empty ones included, against the dense table."""
    path, dense2, dense3 = table
    mask = CooccurrenceMask.load(path)
    stored_pairs = np.argwhere(dense2 > 0)  # row r of the triple table is the r-th stored pair
    bare, long = (int(np.flatnonzero((stored_pairs == p).all(axis=1))[0]) for p in (BARE_PAIR, LONG_PAIR))
    rows = np.array([bare, long, 0, bare, len(stored_pairs) - 1])
    cols = np.array([7, 2, 39, 0, 11])
    i, j, entry = mask._triples.hits(rows, cols)
    grid = np.zeros((rows.size, cols.size), dtype=np.float32)
    grid[i, j] = mask._triples.values[entry]
    a, b = stored_pairs[rows].T
    np.testing.assert_array_equal(grid, dense3[a[:, None], b[:, None], cols[None, :]])
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == i.size  # no cell written twice


def test_pair_grid_cache_serves_back_off_and_never_goes_stale(table, monkeypatch):
    """A back-off asks for the same pairs after the triples; any other ids must miss the cache."""
    path, dense2, dense3 = table
    mask, fresh = CooccurrenceMask.load(path), CooccurrenceMask.load(path)
    searches = []
    search = mask._pairs.entries
    monkeypatch.setattr(mask._pairs, "entries", lambda *args: searches.append(args) or search(*args))
    a, b, c = np.array([1, 3, 8, 1]), np.array([2, 4, 2, 9]), np.array([2, 5])
    mask.weights([a, b, c])
    assert searches
    searched = len(searches)
    pairs = mask.weights([a, b])
    assert len(searches) == searched  # the back-off's pair grid came from the cache
    np.testing.assert_array_equal(pairs, dense2[np.ix_(a, b)])
    np.testing.assert_array_equal(pairs, fresh.weights([a, b]))
    pairs[:] = -1  # the caller owns its grid; the cache must not share it
    np.testing.assert_array_equal(mask.weights([a, b]), dense2[np.ix_(a, b)])
    for x, y in [
        (a, np.array([2, 4, 2, 8])),  # one id changed, at the end
        (a, b[::-1]),  # the same ids, reordered
        (np.array([1, 3]), np.array([8, 1, 2, 4])),  # the same ids split differently
        (a.astype(np.int32), b.astype(np.uint16)),  # other dtypes of the same ids: a hit, still right
        (np.array([], dtype=np.int64), b),
    ]:
        np.testing.assert_array_equal(mask.weights([x, y]), dense2[np.ix_(x, y)])
        np.testing.assert_array_equal(mask.weights([x, y, c]), dense3[np.ix_(x, y, c)])
