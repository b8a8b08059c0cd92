"""Co-occurrence counting, the on-disk format and the grid lookup, checked against brute force."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

import runtime.cooccurrence as rc
import runtime.cooccurrence_file as cf
from dynamo_export.cli.cooccur import main as cooccur_main
from dynamo_export.cooccurrence import build_cooccurrence, count_ngrams, ngram_weights
from dynamo_export.errors import CooccurrenceError
from dynamo_export.tokens import write_token_file
from runtime import CooccurrenceMask
from runtime.errors import CooccurrenceFileError, InputError

# ---------------------------------------------------------------------------------------- references


def brute_ngrams(ids: list[int], eot: int, n: int) -> Counter:
    """Every window of n tokens that has no eot before its last token."""
    grams = Counter()
    for t in range(len(ids) - n + 1):
        gram = tuple(ids[t : t + n])
        if eot not in gram[:-1]:
            grams[gram] += 1
    return grams


def brute_weights(ids: list[int], eot: int, n: int, vocab: int, min_count: int = 1) -> np.ndarray:
    """Dense W of order n: p(gram) / prod p(token), zero below min_count."""
    unigram = Counter(ids)
    grams = brute_ngrams(ids, eot, n)
    positions = sum(grams.values())
    dense = np.zeros((vocab,) * n)
    for gram, count in grams.items():
        if count >= min_count:
            w = count / positions
            for token in gram:
                w /= unigram[token] / len(ids)
            dense[gram] = w
    return dense


def as_counter(keys: np.ndarray, counts: np.ndarray, vocab: int, n: int) -> Counter:
    grams = np.stack(np.unravel_index(keys, (vocab,) * n), axis=1)
    return Counter({tuple(int(x) for x in g): int(c) for g, c in zip(grams, counts, strict=True)})


def random_corpus(seed: int, size: int, vocab: int, eot: int) -> list[int]:
    """Zipf-like ids with documents of random length, so pairs repeat and boundaries are common."""
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, size) - 1, vocab - 1)
    ids[rng.random(size) < 0.05] = eot
    return ids.tolist()


@pytest.fixture
def token_file(tmp_path):
    def make(ids, vocab, eot, name="corpus"):
        write_token_file(tmp_path / name, np.asarray(ids), vocab_size=vocab, eot_id=eot)
        return tmp_path / name

    return make


# ---------------------------------------------------------------------------------------- counting


def test_hand_made_corpus_respects_document_boundaries(token_file):
    # documents: [1 2] eot [1 2 3] eot [3]
    path = token_file([1, 2, 0, 1, 2, 3, 0, 3], vocab=4, eot=0)
    counts = count_ngrams(path, (2, 3), workers=1, progress=False)
    assert counts.unigrams.tolist() == [2, 2, 2, 2]
    pairs = as_counter(counts.ngrams[2].keys, counts.ngrams[2].counts, 4, 2)
    assert pairs == Counter({(1, 2): 2, (2, 0): 1, (2, 3): 1, (3, 0): 1})  # never (0, 1) or (0, 3)
    triples = as_counter(counts.ngrams[3].keys, counts.ngrams[3].counts, 4, 3)
    assert triples == Counter({(1, 2, 0): 1, (1, 2, 3): 1, (2, 3, 0): 1})
    assert counts.ngrams[2].positions == 5 and counts.ngrams[3].positions == 3
    # W(1,2) = (2/5) / ((2/8)(2/8)) = 6.4
    np.testing.assert_allclose(ngram_weights(counts, 2)[0], 6.4, rtol=1e-6)


@pytest.mark.parametrize(
    ("seed", "size", "vocab", "min_count", "shard_tokens"),
    [(0, 3000, 12, 1, 97), (1, 2500, 30, 2, 1000), (2, 800, 7, 3, 5), (3, 1, 5, 1, 1)],
)
def test_counts_match_brute_force(token_file, seed, size, vocab, min_count, shard_tokens):
    eot = seed % vocab
    ids = random_corpus(seed, size, vocab, eot)
    path = token_file(ids, vocab, eot)
    counts = count_ngrams(
        path, (2, 3, 4), min_count, workers=1, shard_tokens=shard_tokens, reduce_keys=50, progress=False
    )
    assert counts.unigrams.tolist() == [ids.count(v) for v in range(vocab)]
    for n in (2, 3, 4):
        expected = brute_ngrams(ids, eot, n)
        table = counts.ngrams[n]
        assert table.positions == sum(expected.values())
        assert np.all(np.diff(table.keys) > 0)
        assert as_counter(table.keys, table.counts, vocab, n) == Counter(
            {g: c for g, c in expected.items() if c >= min_count}
        )


def test_empty_and_eot_only_corpora_give_empty_masks(token_file, tmp_path):
    for name, ids in (("empty", []), ("eots", [0, 0, 0])):
        meta = build_cooccurrence(token_file(ids, 3, 0, name=name), tmp_path / f"{name}-mask", progress=False)
        assert meta.nnz == {2: 0, 3: 0}
        mask = CooccurrenceMask.load(tmp_path / f"{name}-mask")
        assert not mask.weights([np.arange(3)] * 3).any()


def test_count_arguments_are_checked(token_file):
    path = token_file([1, 2, 3], vocab=4, eot=0)
    with pytest.raises(CooccurrenceError, match="min_count"):
        count_ngrams(path, (2,), min_count=0, progress=False)
    with pytest.raises(CooccurrenceError, match="orders"):
        count_ngrams(path, (1, 2), progress=False)
    with pytest.raises(CooccurrenceError, match="order 3 needs order 2"):
        build_cooccurrence(path, path.parent / "out", orders=(3,), progress=False)
    big = token_file([1, 2, 3], vocab=(1 << 21) + 1, eot=0, name="big")
    with pytest.raises(CooccurrenceError, match="int64"):
        count_ngrams(big, (2, 3), progress=False)


# ---------------------------------------------------------------------------------------- W and grids


def test_worker_processes_give_brute_force_weights(token_file, tmp_path):
    vocab, eot = 40, 5
    ids = random_corpus(7, 6000, vocab, eot)
    out = tmp_path / "mask"
    meta = build_cooccurrence(
        token_file(ids, vocab, eot), out, min_count=2, workers=2, shard_tokens=700, progress=False
    )
    dense2 = brute_weights(ids, eot, 2, vocab, min_count=2)
    dense3 = brute_weights(ids, eot, 3, vocab, min_count=2)
    assert meta.nnz == {2: np.count_nonzero(dense2), 3: np.count_nonzero(dense3)}
    assert meta.ngram_positions == {
        2: sum(brute_ngrams(ids, eot, 2).values()),
        3: sum(brute_ngrams(ids, eot, 3).values()),
    }
    mask = CooccurrenceMask.load(out, expected_vocab_size=vocab)
    everything = np.arange(vocab)
    np.testing.assert_allclose(mask.weights([everything, everything]), dense2, rtol=1e-6)
    np.testing.assert_allclose(mask.weights([everything] * 3), dense3, rtol=1e-6)


@pytest.fixture(scope="module")
def zipf_mask(tmp_path_factory):
    """A mask over a skewed corpus (some rows hold most of the vocabulary) and its dense references."""
    vocab, eot = 60, 0
    ids = random_corpus(5, 20000, vocab, eot)
    tmp = tmp_path_factory.mktemp("zipf")
    write_token_file(tmp / "corpus", np.asarray(ids), vocab_size=vocab, eot_id=eot)
    build_cooccurrence(tmp / "corpus", tmp / "mask", workers=1, progress=False)
    mask = CooccurrenceMask.load(tmp / "mask")
    return mask, brute_weights(ids, eot, 2, vocab), brute_weights(ids, eot, 3, vocab)


@pytest.mark.parametrize("scan_factor", [0, 1, 10**9], ids=["search-all", "mixed", "scan-all"])
def test_grids_match_dense_reference(zipf_mask, monkeypatch, scan_factor):
    """Candidate grids in any order, with repeats, whichever way rows are looked up (scan or search)."""
    monkeypatch.setattr(rc, "_SCAN_ROW_FACTOR", scan_factor)
    mask, dense2, dense3 = zipf_mask
    rng = np.random.default_rng(scan_factor)
    for k1, k2, k3 in [(9, 13, 6), (30, 30, 30), (1, 5, 1), (4, 0, 3)]:
        a, b, c = (rng.integers(0, mask.vocab_size, k) for k in (k1, k2, k3))
        a[:2] = [0, 0][: a.size]  # the eot row is long and has no triples
        pair_grid = mask.weights([a, b])
        assert pair_grid.shape == (k1, k2) and pair_grid.dtype == np.float32
        np.testing.assert_allclose(pair_grid, dense2[np.ix_(a, b)], rtol=1e-6)
        triple_grid = mask.weights([a, b, c])
        assert triple_grid.shape == (k1, k2, k3) and triple_grid.dtype == np.float32
        np.testing.assert_allclose(triple_grid, dense3[np.ix_(a, b, c)], rtol=1e-6)
        m = min(k1, k2)
        np.testing.assert_allclose(
            mask.triple_weights_for_pairs(a[:m], b[:m], c),
            dense3[a[:m, None], b[:m, None], c[None, :]],
            rtol=1e-6,
        )
    big = mask.weights([np.arange(mask.vocab_size)] * 2)
    assert 0 < np.count_nonzero(big) < big.size  # the corpus exercises hits and misses


def test_lookup_rejects_bad_ids(tmp_path):
    mask = CooccurrenceMask.load(_small_dir(tmp_path))
    ok = np.array([1, 2])
    with pytest.raises(InputError, match="outside the vocabulary"):
        mask.weights([ok, np.array([1, 10])])
    with pytest.raises(InputError, match="1-D integer"):
        mask.weights([ok, np.array([1.0, 2.0])])
    with pytest.raises(InputError, match="one id array per position"):
        mask.weights([ok])
    with pytest.raises(InputError, match="pair up"):
        mask.triple_weights_for_pairs(ok, ok[:1], ok)


# ---------------------------------------------------------------------------------------- files

PAIRS = {(0, 1): 2.0, (0, 3): 0.5, (1, 1): 7.0, (3, 0): 1e6}
TRIPLES = {(0, 1, 2): 3.0, (1, 1, 1): 4.0, (1, 1, 3): 0.25}


def _keys(table: dict, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    grams = sorted(table)
    keys = np.ravel_multi_index(np.array(grams).T, (vocab,) * len(grams[0])).astype(np.int64)
    return keys, np.array([table[g] for g in grams])


def _small_dir(tmp_path: Path, name: str = "small", weights_scale: float = 1.0, **kwargs) -> Path:
    out = tmp_path / name
    pair_keys, pair_w = _keys(PAIRS, 4)
    cf.save_cooccurrence(
        out,
        vocab_size=4,
        num_tokens=100,
        ngram_positions={2: 90, 3: 80},
        min_count=1,
        eot_id=0,
        weights={2: (pair_keys, pair_w * weights_scale), 3: _keys(TRIPLES, 4)},
        **kwargs,
    )
    return out


def test_save_load_round_trip(tmp_path):
    out = _small_dir(tmp_path)
    header = json.loads((out / "cooccurrence.json").read_text())
    assert header["vocab_size"] == 4 and header["orders"] == [2, 3] and header["format_version"] == 1
    assert header["nnz"] == {"2": 4, "3": 3} and header["value_dtype"] == "float32"
    mask = CooccurrenceMask.load(out, expected_vocab_size=4)
    assert mask.vocab_size == 4 and mask.orders == (2, 3)
    dense2, dense3 = np.zeros((4, 4)), np.zeros((4, 4, 4))
    for gram, w in PAIRS.items():
        dense2[gram] = w
    for gram, w in TRIPLES.items():
        dense3[gram] = w
    ids = np.arange(4)
    np.testing.assert_array_equal(mask.weights([ids, ids]), dense2.astype(np.float32))
    np.testing.assert_array_equal(mask.weights([ids, ids, ids]), dense3.astype(np.float32))
    # The files are ordinary SciPy sparse files; triple rows follow the pairs' CSR entry order.
    pairs = scipy.sparse.load_npz(out / "pairs.npz")
    assert pairs.format == "csr" and pairs.indices.dtype == np.int32
    np.testing.assert_array_equal(pairs.toarray(), dense2.astype(np.float32))
    triples = scipy.sparse.load_npz(out / "triples.npz").toarray()
    assert triples.shape == (4, 4)
    assert (
        triples[0, 2] == 3.0 and triples[2, 1] == 4.0 and triples[2, 3] == 0.25
    )  # (0,1) is entry 0, (1,1) entry 2


def test_pairs_only_file(tmp_path):
    out = tmp_path / "pairs-only"
    cf.save_cooccurrence(
        out,
        vocab_size=4,
        num_tokens=10,
        ngram_positions={2: 9},
        min_count=1,
        eot_id=0,
        weights={2: _keys(PAIRS, 4)},
    )
    assert not (out / "triples.npz").exists()
    mask = CooccurrenceMask.load(out)
    assert mask.orders == (2,)
    with pytest.raises(InputError, match=r"orders \(2,\), got 3"):
        mask.weights([np.arange(2)] * 3)
    with pytest.raises(InputError, match="no triples"):
        mask.triple_weights_for_pairs(np.arange(2), np.arange(2), np.arange(2))


def test_existing_directory_is_not_overwritten(tmp_path):
    out = _small_dir(tmp_path)
    before = (out / "pairs.npz").read_bytes()
    with pytest.raises(CooccurrenceFileError, match="already exists"):
        _small_dir(tmp_path)
    assert (out / "pairs.npz").read_bytes() == before
    _small_dir(tmp_path, force=True)
    other = tmp_path / "not-a-mask"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(CooccurrenceFileError, match="refusing"):
        _small_dir(tmp_path, name="not-a-mask", force=True)
    assert (other / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-mask", "small"]  # no staging leftovers


@pytest.mark.parametrize("failing", [".small.tmp-", "small"])
def test_failed_rename_leaves_old_directory_and_no_staging(tmp_path, monkeypatch, failing):
    """A failure while moving the old directory aside, or while moving the new one in, changes nothing."""
    out = _small_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = cf.os.replace

    def replace(src, dst):
        if Path(src).name.startswith(failing):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(cf.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        _small_dir(tmp_path, weights_scale=2.0, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def _rewrite_npz(path: Path, **replace) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(replace)
    path.unlink()
    np.savez_compressed(path, **arrays)


def _edit_header(path: Path, **fields) -> None:
    header = json.loads((path / "cooccurrence.json").read_text())
    header.update(fields)
    (path / "cooccurrence.json").write_text(json.dumps(header))


CORRUPTIONS = {
    "truncated npz": (
        lambda d: (d / "pairs.npz").write_bytes((d / "pairs.npz").read_bytes()[:-40]),
        "corrupt",
    ),
    "flipped bytes": (lambda d: _flip_data_bytes(d / "triples.npz"), "corrupt or truncated"),
    "object array": (
        lambda d: _rewrite_npz(d / "pairs.npz", data=np.array([1.0, "x", 2.0, 3.0], dtype=object)),
        "object",
    ),
    "float64 values": (lambda d: _rewrite_npz(d / "pairs.npz", data=np.ones(4)), "float64"),
    "index out of range": (
        lambda d: _rewrite_npz(d / "pairs.npz", indices=np.array([1, 3, 1, 9], dtype=np.int32)),
        r"outside \[0, 4\)",
    ),
    "unsorted row": (
        lambda d: _rewrite_npz(d / "pairs.npz", indices=np.array([3, 1, 1, 0], dtype=np.int32)),
        "sorted and unique",
    ),
    "indptr not monotonic": (
        lambda d: _rewrite_npz(d / "pairs.npz", indptr=np.array([0, 3, 2, 2, 4], dtype=np.int32)),
        "indptr",
    ),
    "negative weight": (
        lambda d: _rewrite_npz(d / "pairs.npz", data=np.array([1, -1, 1, 1], dtype=np.float32)),
        "> 0",
    ),
    "huge declared shape": (
        lambda d: _rewrite_npz(d / "pairs.npz", shape=np.array([10**12, 10**12])),
        "declares shape",
    ),
    "huge declared vocab": (lambda d: _edit_header(d, vocab_size=10**12), "vocab_size"),
    "huge declared nnz": (lambda d: _edit_header(d, nnz={"2": 10**10, "3": 3}), r"nnz\[2\]"),
    "nnz disagrees with file": (lambda d: _edit_header(d, nnz={"2": 3, "3": 3}), "expected"),
    "extra member": (lambda d: _rewrite_npz(d / "pairs.npz", payload=np.zeros(3)), "a CSR .npz holds"),
    "missing triples": (lambda d: (d / "triples.npz").unlink(), "not found"),
    "newer format": (lambda d: _edit_header(d, format_version=2), "format_version 2"),
    "not json": (lambda d: (d / "cooccurrence.json").write_text("{oops"), "not valid JSON"),
    "bool vocab": (lambda d: _edit_header(d, vocab_size=True), "vocab_size"),
    "triples for 3 only": (lambda d: _edit_header(d, orders=[3]), "orders"),
}


def _flip_data_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 5, start + info.compress_size - 2):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_files_raise_typed_errors(tmp_path, corruption):
    out = _small_dir(tmp_path)
    damage, message = CORRUPTIONS[corruption]
    damage(out)
    with pytest.raises(CooccurrenceFileError, match=message):
        CooccurrenceMask.load(out)


def test_object_array_is_never_unpickled(tmp_path, monkeypatch):
    out = _small_dir(tmp_path)
    _rewrite_npz(out / "pairs.npz", data=np.array([1.0, "x", 2.0, 3.0], dtype=object))
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr("pickle.load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CooccurrenceFileError, match="object"):
        CooccurrenceMask.load(out)


def test_vocab_mismatch_and_missing_directory(tmp_path):
    out = _small_dir(tmp_path)
    with pytest.raises(CooccurrenceFileError, match="vocabulary of 4 tokens but the model has 50304"):
        CooccurrenceMask.load(out, expected_vocab_size=50304)
    with pytest.raises(CooccurrenceFileError, match="not a directory"):
        CooccurrenceMask.load(tmp_path / "nowhere")
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(CooccurrenceFileError, match="not a co-occurrence directory"):
        CooccurrenceMask.load(out)


def test_writer_rejects_inconsistent_tables(tmp_path):
    def save(weights):
        cf.save_cooccurrence(
            tmp_path / "bad",
            vocab_size=4,
            num_tokens=10,
            ngram_positions={2: 9, 3: 8},
            min_count=1,
            eot_id=0,
            weights=weights,
        )

    pairs = _keys(PAIRS, 4)
    with pytest.raises(CooccurrenceFileError, match="prefix pair"):
        save({2: pairs, 3: _keys({(2, 2, 2): 1.0}, 4)})
    with pytest.raises(CooccurrenceFileError, match="strictly increasing"):
        save({2: (pairs[0][::-1].copy(), pairs[1])})
    with pytest.raises(CooccurrenceFileError, match="finite values > 0"):
        save({2: (pairs[0], np.array([1.0, 0.0, 1.0, 1.0]))})
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(token_file, tmp_path, capsys):
    vocab, eot = 16, 0
    ids = random_corpus(11, 1500, vocab, eot)
    path = token_file(ids, vocab, eot)
    out = tmp_path / "cli-mask"
    argv = ["--tokens", str(path), "--out", str(out), "--orders", "2,3", "--min-count", "2", "--workers", "1"]
    cooccur_main(argv)
    assert f"wrote {out}" in capsys.readouterr().out
    mask = CooccurrenceMask.load(out, expected_vocab_size=vocab)
    everything = np.arange(vocab)
    np.testing.assert_allclose(
        mask.weights([everything] * 3), brute_weights(ids, eot, 3, vocab, min_count=2), rtol=1e-6
    )
    with pytest.raises(SystemExit) as exit_info:
        cooccur_main(argv)
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    cooccur_main([*argv[:-4], "--min-count", "1", "--force"])
    assert json.loads((out / "cooccurrence.json").read_text())["min_count"] == 1
