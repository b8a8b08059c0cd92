"""`dynamo-cooccur --engine spark`: the co-occurrence count of dynamo_export/cooccurrence.py as a Spark job.

Same definitions (docs/METHOD.md), same outputs: `pairs.npz`, `triples.npz` and
`cooccurrence.json` equal to the local engine's, array for array, built from the local
engine's own functions (count_shard, key_ranges, merge_runs, ngram_weights) and written
atomically by the same save_cooccurrence. Only the scheduling differs.

Input: one or more token files (NAME.bin + NAME.json, dynamo_export/tokens.py), each a
local path, a glob, or a URL that fsspec opens (hdfs://, s3://, gs://, file://; s3 needs
s3fs, hdfs pyarrow). Every task reads its own byte range of a .bin (fsspec's cat_file
with start/end), so one file is read by many tasks at once and nothing is copied first;
local paths must be visible to every executor (local mode, or a shared filesystem).
Each file holds whole documents: an n-gram never crosses into the next file, exactly as
it never crosses an eot, so counting files A and B equals counting A + B when A ends
with an eot.

The job, with shards of `shard_tokens` start positions (a task reads up to
max(orders) - 1 tokens past its shard, so every n-gram is counted once, by its shard):

1. first pass, a task per shard: the unigram bincount, the number N_n of in-document
   n-gram positions, and a sample of the keys of the shard's first 64K positions;
   summed with treeReduce. The driver checks the totals against the headers and cuts
   each order's key space into ranges at quantiles of the sample (key_ranges), at most
   `reduce_keys` positions per range.
2. map, a task per shard: count_shard's sorted (key, count) runs, cut at the ranges;
   partitionBy(range) shuffles each range's pieces to one reduce task, which merges
   them (merge_runs, min_count) and computes W from the broadcast unigram counts and
   totals (ngram_weights). The reduced ranges stay on the executors' disks, in records
   of at most 1M n-grams, so no JVM ever holds a whole range.
3. the driver fetches the ranges in key order, in jobs of about 4M n-grams, so
   concatenating them gives the globally sorted tables, and writes the directory.

Memory: a map task about 50 bytes per shard token (as the local engine), a reduce task
about 40 bytes per run entry of its range (in the Python workers, outside the JVM heap),
the driver about 45 bytes per surviving n-gram at its peak, while save_cooccurrence
builds the CSR arrays (measured: benchmarks/bench_cooccur_engines.py).

Progress: the Spark UI's URL when the context starts, Spark's console progress bar,
and a table of every stage (tasks, wall time, summed task time, shuffle bytes) at the
end; the times come from the UI's REST API (without the UI, only tasks are shown).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynamo_export.cooccurrence import (
    DEFAULT_REDUCE_KEYS,
    DEFAULT_SHARD_TOKENS,
    NgramCounts,
    NgramTable,
    check_build,
    check_count_args,
    count_shard,
    key_ranges,
    masks_fingerprint,
    merge_runs,
    ngram_weights,
    run_sample,
    shard_keys,
)
from dynamo_export.errors import TokenFileError
from dynamo_export.spark_session import (
    DEFAULT_MASTER,
    SparkRun,
    format_stages,
    fsspec_module,
    log,
    pyspark_module,
    spark_context,
)
from dynamo_export.tokens import TokenFileMeta, check_token_bytes, parse_token_header
from runtime.cooccurrence_file import CooccurrenceMeta, save_cooccurrence
from runtime.fingerprint import check_same_tokenizer

if TYPE_CHECKING:
    from pyspark import Broadcast, SparkContext

_SAMPLE_STARTS = 1 << 16  # the first pass samples the keys of this many positions per shard
_SAMPLES_PER_SHARD = 1024
_SAMPLE_BUDGET = 1 << 21  # keys sampled in all, at most (fewer per shard on a large corpus)
_RECORD_ENTRIES = (
    1 << 20
)  # n-grams per record a reduce task yields (12 MB): the JVM never holds a whole range
_FETCH_ENTRIES = 1 << 22  # n-grams per fetch job (~50 MB through the driver's JVM)


# ---------------------------------------------------------------------------------------------- the job


def build_cooccurrence_spark(
    tokens: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    orders: Sequence[int] = (2, 3),
    min_count: int = 1,
    force: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    reduce_keys: int = DEFAULT_REDUCE_KEYS,
    progress: bool = True,
    tokenizer: str | os.PathLike | None = None,
    master: str = DEFAULT_MASTER,
    spark_conf: Sequence[str] = (),
    sc: SparkContext | None = None,
) -> CooccurrenceMeta:
    """Count `tokens` (one or more token files) on Spark and write the co-occurrence directory `out_dir`.

    The arguments and the result are build_cooccurrence's. A new SparkContext is started on
    `master` with `spark_conf` ("KEY=VALUE" entries) and stopped at the end, unless `sc` is given.
    """
    pyspark_module(), fsspec_module()  # a missing extra is named before any input is read
    out = Path(out_dir)
    sources = resolve_sources(tokens)
    fingerprint = masks_fingerprint(_recorded_fingerprint(sources), _describe(sources), tokenizer)
    check_build(out, orders, force)
    context = nullcontext(sc) if sc is not None else spark_context(master, spark_conf, progress)
    with context as spark:
        if progress:
            log(f"Spark {spark.version} on {spark.master}: UI {spark.uiWebUrl or 'off (spark.ui.enabled)'}")
        run = SparkRun(spark, progress)
        weighted = count_weights_spark(run, sources, orders, min_count, shard_tokens, reduce_keys)
        stages = run.stages()
    with run.phase("write the directory (driver)", jobs=False):
        meta = save_cooccurrence(
            out,
            vocab_size=weighted.vocab_size,
            num_tokens=weighted.num_tokens,
            ngram_positions=weighted.positions,
            min_count=min_count,
            eot_id=weighted.eot_id,
            weights=weighted.weights,
            force=force,
            tokenizer_fingerprint=fingerprint,
        )
    if progress:
        log(format_stages(stages, run.phases))
    return meta


@dataclass(frozen=True)
class WeightedNgrams:
    """What the Spark job hands the writer: totals and, per order, the sorted keys and their W."""

    vocab_size: int
    eot_id: int
    num_tokens: int
    positions: dict[int, int]  # N_n
    weights: dict[int, tuple[np.ndarray, np.ndarray]]  # n -> ((nnz,) int64 keys, (nnz,) float32 W)


def count_weights_spark(
    run: SparkRun,
    sources: Sequence[TokenSource],
    orders: Sequence[int] = (2, 3),
    min_count: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    reduce_keys: int = DEFAULT_REDUCE_KEYS,
) -> WeightedNgrams:
    """The three steps of the module docstring on `run`'s SparkContext."""
    from pyspark import StorageLevel

    orders = tuple(sorted(set(orders)))
    V, eot_id = sources[0].meta.vocab_size, sources[0].meta.eot_id
    check_count_args(orders, min_count, None, shard_tokens, reduce_keys, V)
    shards = [
        (source, start, min(start + shard_tokens, source.meta.num_tokens))
        for source in sources
        for start in range(0, source.meta.num_tokens, shard_tokens)
    ]
    num_tokens = sum(source.meta.num_tokens for source in sources)
    if not shards:  # only empty files: no job to run
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        return WeightedNgrams(V, eot_id, 0, dict.fromkeys(orders, 0), dict.fromkeys(orders, empty))
    sc = run.sc
    shard_rdd = sc.parallelize(shards, len(shards))

    per_shard = max(16, min(_SAMPLES_PER_SHARD, _SAMPLE_BUDGET // len(shards)))
    with run.phase("first pass: unigrams, totals, key sample"):
        unigrams, positions, samples = shard_rdd.map(
            partial(_first_pass, orders=orders, samples=per_shard)
        ).treeReduce(_add_stats)
    if int(unigrams.sum()) != num_tokens:
        raise TokenFileError(
            f"the shards hold {int(unigrams.sum()):,} tokens but the headers declare {num_tokens:,}: "
            f"a token file changed while it was read ({_describe(sources)})"
        )
    cuts, offsets, range_orders = _plan_ranges(samples, positions, sc.defaultParallelism, reduce_keys)
    if run.progress:
        sizes = ", ".join(f"{n}-grams {range_orders.count(n)}" for n in orders)
        log(f"{len(sources)} token file(s), {num_tokens:,} tokens, {len(shards)} shards; key ranges: {sizes}")

    totals = sc.broadcast((unigrams, positions, num_tokens))
    reduced = (
        shard_rdd.flatMap(partial(_map_runs, orders=orders, cuts=cuts, offsets=offsets))
        .partitionBy(len(range_orders), _identity)
        .mapPartitionsWithIndex(
            partial(
                _reduce_range,
                range_orders=range_orders,
                totals=totals,
                min_count=min_count,
                eot_id=eot_id,
                record_entries=_RECORD_ENTRIES,
            )
        )
        .persist(StorageLevel.DISK_ONLY)  # read once, by the fetch: no JVM heap for it
    )
    try:
        with run.phase("count n-grams (map), merge ranges + W (reduce)"):
            sizes = dict.fromkeys(range(len(range_orders)), 0)
            for index, size in reduced.map(_record_size).collect():
                sizes[index] += size
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in orders}
        with run.phase("fetch the ranges (driver)"):
            for batch in _batches(range(len(range_orders)), sizes, _FETCH_ENTRIES):
                for index, _, keys, w in sorted(sc.runJob(reduced, _whole, batch), key=_place):
                    parts[range_orders[index]].append((keys, w))
    finally:
        reduced.unpersist()
        totals.unpersist()
    weights = {
        n: (np.concatenate([k for k, _ in parts[n]]), np.concatenate([w for _, w in parts[n]]))
        for n in orders
    }
    return WeightedNgrams(V, eot_id, num_tokens, {n: int(positions[n]) for n in orders}, weights)


def _plan_ranges(
    samples: dict[int, list[np.ndarray]], positions: dict[int, int], parallelism: int, reduce_keys: int
) -> tuple[dict[int, np.ndarray], dict[int, int], list[int]]:
    """About max(parallelism, N_n / reduce_keys) key ranges per order n, a partition each:
    (order -> the ranges' cut keys, order -> its first partition, partition -> its order)."""
    cuts, offsets, range_orders = {}, {}, []
    for n in sorted(samples):
        ranges = key_ranges(samples[n], max(parallelism, math.ceil(positions[n] / reduce_keys)))
        cuts[n] = np.array([lo for lo, _ in ranges[1:]], dtype=np.int64)
        offsets[n] = len(range_orders)
        range_orders += [n] * len(ranges)
    return cuts, offsets, range_orders


# What the executors run: module-level functions (pickled by reference), bound with functools.partial.


def _first_pass(
    shard: tuple[TokenSource, int, int], orders: tuple[int, ...], samples: int
) -> tuple[np.ndarray, dict[int, int], dict[int, list[np.ndarray]]]:
    """(unigram bincount, {n: N_n}, {n: [a sample of the shard's sorted keys]}) of one shard."""
    source, start, end = shard
    meta = source.meta
    segment = source.read(start, min(end + orders[-1] - 1, meta.num_tokens)).astype(np.int64)
    unigrams = np.bincount(segment[: end - start], minlength=meta.vocab_size)
    positions, sampled = {}, {}
    for n in orders:
        keys, positions[n] = shard_keys(segment, end - start, n, meta.vocab_size, meta.eot_id)
        sampled[n] = [run_sample(np.unique(keys[:_SAMPLE_STARTS]), samples)]
    return unigrams, positions, sampled


def _add_stats(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], {n: a[1][n] + b[1][n] for n in a[1]}, {n: a[2][n] + b[2][n] for n in a[2]}


def _map_runs(
    shard: tuple[TokenSource, int, int],
    orders: tuple[int, ...],
    cuts: dict[int, np.ndarray],
    offsets: dict[int, int],
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """The shard's sorted runs, cut at the key ranges: (partition index, (keys, counts)) per non-empty piece."""
    source, start, end = shard
    meta = source.meta
    segment = source.read(start, min(end + orders[-1] - 1, meta.num_tokens))
    _, runs = count_shard(segment, end - start, orders, meta.vocab_size, meta.eot_id)
    for n, (keys, counts, _) in runs.items():
        bounds = [0, *np.searchsorted(keys, cuts[n]).tolist(), keys.size]
        for r, (a, b) in enumerate(pairwise(bounds)):
            if b > a:
                yield offsets[n] + r, (keys[a:b], counts[a:b])


def _identity(index: int) -> int:
    return index


def _reduce_range(
    index: int,
    pieces: Iterable,
    range_orders: list[int],
    totals: Broadcast,
    min_count: int,
    eot_id: int,
    record_entries: int,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """One key range: merge its pieces from every shard and weigh the survivors; (index, start, keys, W)
    records of up to `record_entries` n-grams each, at least one."""
    n = range_orders[index]
    unigrams, positions, num_tokens = totals.value
    key_parts, count_parts = [], []
    for _, (keys, counts) in pieces:
        key_parts.append(keys)
        count_parts.append(counts)
    keys, counts = merge_runs(key_parts, count_parts, min_count)
    tables = {n: NgramTable(keys, counts, positions[n])}
    w = ngram_weights(NgramCounts(unigrams.size, eot_id, num_tokens, min_count, unigrams, tables), n)
    for start in range(0, max(keys.size, 1), record_entries):
        yield index, start, keys[start : start + record_entries], w[start : start + record_entries]


def _record_size(record: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[int, int]:
    return record[0], record[2].size


def _whole(records: Iterable) -> list:
    return list(records)


def _place(record: tuple) -> tuple[int, int]:
    return record[0], record[1]


def _batches(indices: Iterable[int], sizes: dict[int, int], limit: int) -> Iterator[list[int]]:
    """Consecutive indices in groups of about `limit` entries (at least one index per group)."""
    batch, entries = [], 0
    for index in indices:
        batch.append(index)
        entries += sizes.get(index, 0)
        if entries >= limit:
            yield batch
            batch, entries = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class TokenSource:
    """One input token file: the URL of its .bin (a local path or anything fsspec opens) and its header."""

    url: str
    meta: TokenFileMeta

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids [start, stop) as little-endian uint16/uint32, read as one byte range."""
        dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        fs, path = fsspec_module().core.url_to_fs(self.url)
        data = fs.cat_file(path, start=start * dtype.itemsize, end=stop * dtype.itemsize)
        if len(data) != (stop - start) * dtype.itemsize:
            raise TokenFileError(
                f"{self.url}: read {len(data)} bytes of tokens [{start}, {stop}), expected "
                f"{(stop - start) * dtype.itemsize}: the file changed since its header was read"
            )
        return np.frombuffer(data, dtype=dtype)


def resolve_sources(tokens: str | os.PathLike | Sequence[str | os.PathLike]) -> list[TokenSource]:
    """The token files named by `tokens` (NAME, NAME.bin or NAME.json; globs expanded, in sorted order),
    with their headers read and checked to share one vocabulary, eot id and tokenizer."""
    names = [tokens] if isinstance(tokens, str | os.PathLike) else list(tokens)
    if not names:
        raise TokenFileError("no token file given")
    fsspec = fsspec_module()
    sources, seen = [], set()
    for name in map(str, names):
        fs, path = fsspec.core.url_to_fs(name)
        matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        if not matches:
            raise TokenFileError(f"no file matches {name}")
        for match in matches:
            base = re.sub(r"\.(bin|json)$", "", match)
            if base not in seen:
                seen.add(base)
                sources.append(_read_source(fs, base))
    first = sources[0]
    known = next((s for s in sources if s.meta.tokenizer_fingerprint), first)
    for source in sources[1:]:
        if (source.meta.vocab_size, source.meta.eot_id) != (first.meta.vocab_size, first.meta.eot_id):
            raise TokenFileError(
                f"{source.url} has vocab_size {source.meta.vocab_size} and eot_id {source.meta.eot_id} but "
                f"{first.url} {first.meta.vocab_size} and {first.meta.eot_id}: count one tokenizer's files together"
            )
        check_same_tokenizer(
            known.meta.tokenizer_fingerprint,
            f"token file {known.url}",
            source.meta.tokenizer_fingerprint,
            f"token file {source.url}",
            "count one tokenizer's token files together",
        )
    return sources


def _read_source(fs, base: str) -> TokenSource:
    """The header checks of tokens.read_token_meta, through fsspec so that remote files pass them too."""
    from fsspec.implementations.local import LocalFileSystem

    local = isinstance(fs, LocalFileSystem)  # shown and read as a plain path
    bin_url, json_url = (
        f"{base}{s}" if local else fs.unstrip_protocol(f"{base}{s}") for s in (".bin", ".json")
    )
    try:
        text = fs.cat_file(f"{base}.json")
    except FileNotFoundError as exc:
        raise TokenFileError(
            f"{json_url} not found: a token file is NAME.bin + NAME.json (make one with dynamo-data)"
        ) from exc
    except OSError as exc:
        raise TokenFileError(f"{json_url} cannot be read as a token-file header: {exc}") from exc
    meta = parse_token_header(text, json_url)
    try:
        size = fs.size(f"{base}.bin")
    except OSError as exc:
        raise TokenFileError(f"{bin_url} not found next to {json_url} ({exc})") from exc
    check_token_bytes(meta, size, bin_url)
    return TokenSource(url=bin_url, meta=meta)


def _recorded_fingerprint(sources: Sequence[TokenSource]) -> str | None:
    return next((s.meta.tokenizer_fingerprint for s in sources if s.meta.tokenizer_fingerprint), None)


def _describe(sources: Sequence[TokenSource]) -> str:
    more = f" (+{len(sources) - 1} more)" if len(sources) > 1 else ""
    return f"token file {sources[0].url}{more}"


# ---------------------------------------------------------------------------------------------- Spark
