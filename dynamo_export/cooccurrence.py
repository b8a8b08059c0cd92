"""Count adjacent n-grams of a token file and write the co-occurrence weights W the runtime masks with.

Definitions (docs/METHOD.md, "Co-occurrence weighted masking"), for a token file x_0 .. x_{N-1}:

- An n-gram never crosses a document boundary: the end-of-text id may appear only as
  its last token. (x, eot) is counted — a multi-token emission may end a document —
  but (eot, y) and (x, eot, y), which join unrelated documents, never are.
- p(a) = count(a) / N over every token of the file, eot included (so W(x, eot) exists).
- p(a,b) = count(a,b) / N_2, where N_2 is the number of positions t that start an
  in-document pair (t + 1 < N and x_t != eot); p(a,b,c) = count(a,b,c) / N_3 likewise
  (t + 2 < N, x_t != eot, x_{t+1} != eot). Each p^ is a relative frequency over the
  n-grams of its own order.
- W(a,b) = p(a,b) / (p(a) p(b)); W(a,b,c) = p(a,b,c) / (p(a) p(b) p(c)), in float64,
  stored as float32.
- min_count K keeps the pairs and triples seen at least K times. N, N_2, N_3 and the
  unigram counts are corpus totals taken before the filter, so filtering removes
  entries without changing the surviving weights. Since count(a,b) >= count(a,b,c),
  the prefix pair of every surviving triple survives too (runtime/cooccurrence_file.py's
  triple layout relies on it).

Counting is a map-reduce over base-V int64 keys (a*V + b, (a*V + b)*V + c):

- map: the file is cut into shards of `shard_tokens` start positions; a worker
  process memory-maps its shard (plus order - 1 tokens past its end, so every n-gram
  is counted exactly once, by the shard it starts in), takes a unigram bincount, and
  for each order reduces the shard's keys with np.unique to a sorted (key, count) run
  that it spills to .npy files in a work directory.
- reduce: the key space is cut into ranges at quantiles of a sample of the runs'
  keys, about `reduce_keys` run entries per range; a worker binary-searches its range
  in every memory-mapped run, merges the slices (a stable sort of sorted runs),
  sums the counts of equal keys, applies min_count and spills the result. The ranges,
  concatenated in order, are the globally sorted table.

Memory: a map task holds about 50 bytes per shard token (200 MB for the default 4M),
a reduce task about 40 bytes per run entry of its range, and the parent only the
surviving keys and counts (16 bytes per n-gram) plus W. On a cluster the same two
steps run as a Spark job (dynamo_export/cooccurrence_spark.py, `dynamo-cooccur --engine
spark`), built from this module's count_shard, key_ranges, merge_runs and ngram_weights.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dynamo_export.errors import CooccurrenceError
from dynamo_export.tokens import open_tokens, read_token_meta
from runtime.cooccurrence_file import SUPPORTED_ORDERS, CooccurrenceMeta, save_cooccurrence
from runtime.errors import CooccurrenceFileError
from runtime.fingerprint import check_same_tokenizer, tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 1 << 22
DEFAULT_REDUCE_KEYS = 1 << 23
_SAMPLES_PER_RUN = 1024
_WEIGHT_CHUNK = 1 << 22


@dataclass(frozen=True)
class NgramTable:
    """The n-grams of one order that survived min_count."""

    keys: np.ndarray  # (n,) int64 base-V codes, strictly increasing
    counts: np.ndarray  # (n,) int64, each >= min_count
    positions: int  # in-document start positions counted (N_n), before min_count


@dataclass(frozen=True)
class NgramCounts:
    vocab_size: int
    eot_id: int
    num_tokens: int
    min_count: int
    unigrams: np.ndarray  # (V,) int64
    ngrams: dict[int, NgramTable]


def build_cooccurrence(
    tokens_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    orders: Sequence[int] = (2, 3),
    min_count: int = 1,
    workers: int | None = None,
    force: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    tokenizer: str | os.PathLike | None = None,
) -> CooccurrenceMeta:
    """Count `tokens_path` and write its co-occurrence directory `out_dir` (the dynamo-cooccur job).

    The masks record the token file's tokenizer fingerprint, so dynamo-export and the runtime can
    refuse them beside another tokenizer's model; `tokenizer` (optional) must be the one the token
    file was made with, and supplies the fingerprint when the file predates fingerprints.
    """
    out = Path(out_dir)
    fingerprint = _masks_fingerprint(tokens_path, tokenizer)
    check_build(out, orders, force)
    counts = count_ngrams(
        tokens_path,
        orders,
        min_count,
        workers,
        shard_tokens=shard_tokens,
        work_dir=out.parent,
        progress=progress,
    )
    return save_cooccurrence(
        out,
        vocab_size=counts.vocab_size,
        num_tokens=counts.num_tokens,
        ngram_positions={n: t.positions for n, t in counts.ngrams.items()},
        min_count=counts.min_count,
        eot_id=counts.eot_id,
        weights={n: (counts.ngrams[n].keys, ngram_weights(counts, n)) for n in counts.ngrams},
        force=force,
        tokenizer_fingerprint=fingerprint,
    )


def check_build(out: Path, orders: Sequence[int], force: bool) -> None:
    """Refuse unsupported orders or an existing `out` without force before counting, not after; make its parent."""
    if tuple(sorted(orders)) not in SUPPORTED_ORDERS:
        raise CooccurrenceError(
            f"orders must be one of {[list(o) for o in SUPPORTED_ORDERS]}, got {list(orders)}: triples "
            "are stored per pair, so order 3 needs order 2"
        )
    if (out.exists() or out.is_symlink()) and not force:
        raise CooccurrenceFileError(
            f"{out} already exists; pass force=True (dynamo-cooccur --force) to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)


def _masks_fingerprint(tokens_path: str | os.PathLike, tokenizer: str | os.PathLike | None) -> str | None:
    recorded = read_token_meta(tokens_path).tokenizer_fingerprint
    return masks_fingerprint(recorded, f"token file {tokens_path}", tokenizer)


def masks_fingerprint(recorded: str | None, source: str, tokenizer: str | os.PathLike | None) -> str | None:
    """The fingerprint the masks record: the token file's (`recorded`, read from `source`), checked against
    `tokenizer` when given."""
    if tokenizer is None:
        return recorded
    given = tokenizer_fingerprint(tokenizer)
    check_same_tokenizer(
        recorded,
        source,
        given,
        f"--tokenizer {tokenizer}",
        f"re-tokenize the text with dynamo-data tokenize --tokenizer {tokenizer}, or pass the tokenizer "
        "the token file was made with",
    )
    return given


def ngram_weights(counts: NgramCounts, order: int) -> np.ndarray:
    """W of every surviving n-gram of `order` (see the module docstring), float64 math, float32 result."""
    table = counts.ngrams[order]
    unigram_p = counts.unigrams / max(counts.num_tokens, 1)  # (V,) float64
    out = np.empty(table.keys.size, dtype=np.float32)
    for start in range(0, table.keys.size, _WEIGHT_CHUNK):
        rest = table.keys[start : start + _WEIGHT_CHUNK]
        w = table.counts[start : start + _WEIGHT_CHUNK] / table.positions
        for _ in range(order):
            rest, token = np.divmod(rest, counts.vocab_size)
            w /= unigram_p[token]
        out[start : start + w.size] = w
    return out


def count_ngrams(
    tokens_path: str | os.PathLike,
    orders: Sequence[int] = (2, 3),
    min_count: int = 1,
    workers: int | None = None,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    reduce_keys: int = DEFAULT_REDUCE_KEYS,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> NgramCounts:
    """Unigram counts and the in-document n-grams of each order seen >= min_count times (map-reduce above)."""
    meta = read_token_meta(tokens_path)
    orders = tuple(sorted(set(orders)))
    check_count_args(orders, min_count, workers, shard_tokens, reduce_keys, meta.vocab_size)
    workers = workers or os.cpu_count() or 1
    shards = [(s, min(s + shard_tokens, meta.num_tokens)) for s in range(0, meta.num_tokens, shard_tokens)]
    with (
        _pool(workers, len(shards)) as pool,
        tempfile.TemporaryDirectory(dir=work_dir, prefix=".dynamo-cooccur-") as tmp,
    ):
        unigrams = np.zeros(meta.vocab_size, dtype=np.int64)
        runs: dict[int, list[tuple[str, str]]] = {n: [] for n in orders}
        positions = dict.fromkeys(orders, 0)
        tasks = [(str(tokens_path), i, start, end, orders, tmp) for i, (start, end) in enumerate(shards)]
        with tqdm(
            total=meta.num_tokens, unit="tok", unit_scale=True, desc="count", disable=not progress
        ) as bar:
            for shard_unigrams, shard_runs, (start, end) in _run(pool, _map_shard, tasks):
                unigrams += shard_unigrams
                for n, (keys_path, counts_path, n_positions) in shard_runs.items():
                    runs[n].append((keys_path, counts_path))
                    positions[n] += n_positions
                bar.update(end - start)
        ngrams = {
            n: NgramTable(
                *_reduce(pool, runs[n], n, min_count, workers, reduce_keys, tmp, progress), positions[n]
            )
            for n in orders
        }
    return NgramCounts(meta.vocab_size, meta.eot_id, meta.num_tokens, min_count, unigrams, ngrams)


def check_count_args(
    orders: tuple[int, ...], min_count: int, workers: int | None, shard_tokens: int, reduce_keys: int, V: int
) -> None:
    """CooccurrenceError for counting arguments no engine can honour (`orders` sorted and unique)."""
    if not orders or orders[0] < 2:
        raise CooccurrenceError(f"orders must be integers >= 2, got {list(orders)}")
    if V ** orders[-1] - 1 > np.iinfo(np.int64).max:
        raise CooccurrenceError(
            f"{orders[-1]}-grams over a vocabulary of {V} do not fit int64 keys (V**{orders[-1]} > 2**63)"
        )
    if type(min_count) is not int or min_count < 1:
        raise CooccurrenceError(f"min_count must be an integer >= 1, got {min_count!r}")
    if workers is not None and workers < 1:
        raise CooccurrenceError(f"workers must be >= 1 (or None for one per CPU), got {workers}")
    if shard_tokens < 1 or reduce_keys < 1:
        raise CooccurrenceError(
            f"shard_tokens and reduce_keys must be >= 1, got {shard_tokens}, {reduce_keys}"
        )


def _pool(workers: int, shards: int) -> AbstractContextManager[ProcessPoolExecutor | None]:
    """One process pool for all map and reduce tasks, or None to run them in this process."""
    if workers == 1 or shards <= 1:
        return nullcontext()
    # spawn, not fork: the parent may hold torch or tqdm threads, and forking a threaded process is unsafe.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run(pool: ProcessPoolExecutor | None, fn: Callable, tasks: list[tuple]) -> Iterator:
    """fn(*task) for every task, in completion order."""
    if pool is None:
        yield from (fn(*task) for task in tasks)
        return
    for future in as_completed([pool.submit(fn, *task) for task in tasks]):
        yield future.result()


# ---------------------------------------------------------------------------------------------- map


def _map_shard(
    tokens_path: str, index: int, start: int, end: int, orders: tuple[int, ...], tmp: str
) -> tuple[np.ndarray, dict[int, tuple[str, str, int]], tuple[int, int]]:
    """Count the n-grams starting in [start, end): (unigram bincount, {order: (keys.npy, counts.npy, N_n)})."""
    ids, meta = open_tokens(tokens_path)
    segment = ids[start : min(end + orders[-1] - 1, meta.num_tokens)]
    unigrams, counted = count_shard(segment, end - start, orders, meta.vocab_size, meta.eot_id)
    runs = {}
    for n, (keys, counts, positions) in counted.items():
        base = Path(tmp) / f"map-{n}-{index:06d}"
        runs[n] = (_save(f"{base}-keys.npy", keys), _save(f"{base}-counts.npy", counts), positions)
    return unigrams, runs, (start, end)


def count_shard(
    segment: np.ndarray, starts: int, orders: tuple[int, ...], V: int, eot_id: int
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray, int]]]:
    """A shard's map step: the unigram bincount of segment[:starts] and, per order, the sorted run
    (keys, int64 counts, N_n) of the in-document n-grams starting there. `segment` holds the shard's
    tokens plus up to orders[-1] - 1 tokens past its end."""
    segment = np.asarray(segment, dtype=np.int64)
    unigrams = np.bincount(segment[:starts], minlength=V)
    runs = {}
    for n in orders:
        keys, positions = shard_keys(segment, starts, n, V, eot_id)
        keys, counts = np.unique(keys, return_counts=True)
        runs[n] = (keys, counts.astype(np.int64), positions)
    return unigrams, runs


def shard_keys(segment: np.ndarray, starts: int, n: int, V: int, eot_id: int) -> tuple[np.ndarray, int]:
    """Base-V keys of the in-document n-grams starting at segment[:starts]; eot only in last place."""
    m = max(0, min(starts, segment.size - n + 1))  # starts whose n-gram lies inside the file
    keys = segment[:m].copy()
    inside = np.ones(m, dtype=bool)
    for j in range(1, n):
        inside &= segment[j - 1 : j - 1 + m] != eot_id
        keys *= V
        keys += segment[j : j + m]
    return keys[inside], int(inside.sum())


def _save(path: str, array: np.ndarray) -> str:
    np.save(path, array, allow_pickle=False)
    return path


# ---------------------------------------------------------------------------------------------- reduce


def _reduce(
    pool: ProcessPoolExecutor | None,
    runs: list[tuple[str, str]],
    n: int,
    min_count: int,
    workers: int,
    reduce_keys: int,
    tmp: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the sorted runs of one order into its global sorted (keys, counts), min_count applied."""
    if not runs:  # an empty token file
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ranges = _key_ranges([k for k, _ in runs], max(workers, math.ceil(_run_entries(runs) / reduce_keys)))
    tasks = [(runs, lo, hi, min_count, f"{tmp}/reduce-{n}-{i:06d}") for i, (lo, hi) in enumerate(ranges)]
    parts = {}
    for lo, keys_path, counts_path, size in tqdm(
        _run(pool, _reduce_range, tasks), total=len(tasks), desc=f"merge {n}-grams", disable=not progress
    ):
        parts[lo] = (keys_path, counts_path, size)
    ordered = [parts[lo] for lo, _ in ranges]
    total = sum(size for _, _, size in ordered)
    keys, counts = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64)
    at = 0
    for keys_path, counts_path, size in ordered:
        keys[at : at + size] = _load(keys_path)
        counts[at : at + size] = _load(counts_path)
        at += size
    return keys, counts


def _run_entries(runs: list[tuple[str, str]]) -> int:
    return sum(_load(keys_path).size for keys_path, _ in runs)


def _key_ranges(run_keys: Iterable[str], parts: int) -> list[tuple[int, int | None]]:
    return key_ranges([run_sample(_load(path)) for path in run_keys], parts)


def run_sample(keys: np.ndarray, size: int = _SAMPLES_PER_RUN) -> np.ndarray:
    """About `size` evenly spaced keys of a sorted run."""
    return np.asarray(keys[:: max(1, keys.size // size)])


def key_ranges(samples: list[np.ndarray], parts: int) -> list[tuple[int, int | None]]:
    """Cut the key space into about `parts` [lo, hi) ranges of similar size, at quantiles of the runs'
    samples; hi None means 'to the end'."""
    sample = np.unique(np.concatenate(samples)) if samples else np.zeros(0, dtype=np.int64)
    if parts <= 1 or sample.size <= 1:
        return [(0, None)]
    cuts = np.unique(sample[np.linspace(0, sample.size, parts + 1)[1:-1].astype(np.int64)])
    cuts = [int(c) for c in cuts if c > 0]
    return list(zip([0, *cuts], [*cuts, None], strict=True))


def _reduce_range(
    runs: list[tuple[str, str]], lo: int, hi: int | None, min_count: int, out_base: str
) -> tuple[int, str, str, int]:
    """Sum the counts of the keys in [lo, hi) across all runs, keep those >= min_count, spill them."""
    key_parts, count_parts = [], []
    for keys_path, counts_path in runs:
        keys = _load(keys_path)
        a = int(np.searchsorted(keys, lo))
        b = keys.size if hi is None else int(np.searchsorted(keys, hi))
        key_parts.append(np.array(keys[a:b]))
        count_parts.append(np.array(_load(counts_path)[a:b]))
    keys, counts = merge_runs(key_parts, count_parts, min_count)
    return lo, _save(f"{out_base}-keys.npy", keys), _save(f"{out_base}-counts.npy", counts), keys.size


def merge_runs(
    key_parts: list[np.ndarray], count_parts: list[np.ndarray], min_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """A reduce step: sum the counts of equal keys over sorted runs, keep those >= min_count. The lists are
    emptied, so the parts are freed once concatenated."""
    keys = np.concatenate(key_parts) if key_parts else np.zeros(0, dtype=np.int64)
    counts = np.concatenate(count_parts) if count_parts else np.zeros(0, dtype=np.int64)
    key_parts.clear()
    count_parts.clear()
    order = np.argsort(keys, kind="stable")  # timsort: linear-ish on a concatenation of sorted runs
    keys, counts = keys[order], counts[order]
    del order
    if keys.size:
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        keys, counts = keys[first], np.add.reduceat(counts, first)
    keep = counts >= min_count
    return keys[keep], counts[keep]


def _load(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)
