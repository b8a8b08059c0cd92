"""Co-occurrence masks on a real corpus: counting cost, file sizes, load time and grid lookup times.

    python benchmarks/bench_cooccurrence.py [TOKENS] [--workers N] [--min-count K]

TOKENS is a token file (NAME.bin + NAME.json). Without it the script builds one
offline from this Python's standard library sources (one document per .py file):
it trains a 50k byte-level BPE with dynamo_export.data and caches both under
--cache. Counting runs the dynamo-cooccur CLI in a subprocess so its peak RSS
(parent and worker processes) is measured alone.

Lookup candidates are k distinct ids drawn with probability proportional to their
corpus frequency, the way top-k candidates of a trained model concentrate on
frequent tokens; uniform ids would almost never hit a stored n-gram.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse

from dynamo_export.tokens import open_tokens
from runtime import CooccurrenceMask

KS = (10, 50, 100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "tokens", nargs="?", help="token file NAME (default: build one from the stdlib sources)"
    )
    parser.add_argument("--cache", default="/tmp/dynamo-bench-cooccurrence", help="work and cache directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--min-count", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=50_000, help="BPE size for the stdlib corpus")
    parser.add_argument("--repeats", type=int, default=200, help="lookups timed per grid size")
    args = parser.parse_args()
    cache = Path(args.cache)
    tokens = Path(args.tokens) if args.tokens else stdlib_token_file(cache, args.vocab_size)
    ids, meta = open_tokens(tokens)
    print(f"corpus {tokens}: {meta.num_tokens:,} tokens, vocab {meta.vocab_size}, eot {meta.eot_id}")

    out = cache / f"mask-min{args.min_count}"
    count_once(tokens, out, args.workers, args.min_count)
    report_files(out)
    mask = report_load(out, meta.vocab_size)
    report_lookups(mask, np.bincount(ids, minlength=meta.vocab_size), args.repeats)


# ---------------------------------------------------------------------------------------------- corpus


def stdlib_token_file(cache: Path, vocab_size: int) -> Path:
    """The standard library's UTF-8 .py files tokenized with a BPE trained on them (cached)."""
    from dynamo_export.data import tokenize_files, train_tokenizer

    tokens = cache / "stdlib-tokens"
    if tokens.with_suffix(".json").is_file():
        return tokens
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few test files are deliberately not UTF-8
        files.append(path)
    print(f"building {tokens} from {len(files)} files under {stdlib}")
    tokenizer = cache / "stdlib-bpe.json"
    started = time.perf_counter()
    train_tokenizer(files, vocab_size, tokenizer)
    tokenize_files(tokenizer, files, tokens)
    print(f"  tokenizer + token file: {time.perf_counter() - started:.1f} s")
    return tokens


# ---------------------------------------------------------------------------------------------- counting


def count_once(tokens: Path, out: Path, workers: int, min_count: int) -> None:
    """Run dynamo-cooccur in a child; print wall time, peak RSS of the largest process and of the whole tree."""
    baseline = _child_max_rss_mb([sys.executable, "-c", "import dynamo_export.cooccurrence"])
    command = [sys.executable, "-m", "dynamo_export.cli.cooccur", "--tokens", str(tokens), "--out", str(out)]
    command += ["--workers", str(workers), "--min-count", str(min_count), "--force"]
    started = time.perf_counter()
    process = psutil.Popen(command, stderr=subprocess.DEVNULL)
    tree_peak = _poll_tree_rss(process)
    if process.wait() != 0:
        raise SystemExit(f"dynamo-cooccur failed: {' '.join(command)}")
    elapsed = time.perf_counter() - started
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\ncounting (orders 2,3, min_count {min_count}, {workers} workers): {elapsed:.1f} s wall")
    print(f"  peak RSS: largest process {largest:.0f} MB, whole process tree {tree_peak:.0f} MB")
    print(f"  (of which importing dynamo_export costs {baseline:.0f} MB per process)")


def _child_max_rss_mb(command: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024


def _poll_tree_rss(process: psutil.Popen) -> float:
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [process, *process.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                total = 0
            peak = max(peak, total / 2**20)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    process.wait()
    done.set()
    thread.join()
    return peak


# ---------------------------------------------------------------------------------------------- files


def report_files(out: Path) -> None:
    print("\nfiles (float64 COO = int64 coordinates + float64 value per entry, uncompressed):")
    for name, coords in (("pairs.npz", 2), ("triples.npz", 3)):
        matrix = scipy.sparse.load_npz(out / name)
        size = (out / name).stat().st_size
        coo = matrix.nnz * (coords * 8 + 8)
        print(
            f"  {name}: nnz {matrix.nnz:,}, {size / 1e6:.1f} MB vs float64 COO {coo / 1e6:.1f} MB "
            f"({coo / size:.1f}x smaller, {8 * size / max(matrix.nnz, 1):.1f} bits/entry)"
        )
        report_dtypes(matrix)


def report_dtypes(matrix: scipy.sparse.csr_array) -> None:
    """What float16 values or int64 indices would cost or save, and float16's effect on W."""
    ours = _npz_size(matrix.data, matrix.indices, matrix.indptr, matrix.shape)
    with np.errstate(over="ignore"):  # overflow is what we are counting
        half = matrix.data.astype(np.float16)
    finite = np.isfinite(half)
    rel = np.abs(half[finite].astype(np.float64) - matrix.data[finite]) / matrix.data[finite]
    f16 = _npz_size(half, matrix.indices, matrix.indptr, matrix.shape)
    i64 = _npz_size(
        matrix.data, matrix.indices.astype(np.int64), matrix.indptr.astype(np.int64), matrix.shape
    )
    print(
        f"    float16 values: {100 * (1 - f16 / ours):+.1f}% size saved, {100 * (1 - finite.mean()):.2f}% of W "
        f"overflow (max W {matrix.data.max():.3g}), max rel. error {rel.max() if rel.size else 0:.2g}; "
        f"int64 indices: {100 * (i64 / ours - 1):+.1f}% size"
    )


def _npz_size(data, indices, indptr, shape) -> int:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, data=data, indices=indices, indptr=indptr, format=b"csr", shape=shape)
    return buffer.tell()


def report_load(out: Path, vocab_size: int) -> CooccurrenceMask:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        mask = CooccurrenceMask.load(out, expected_vocab_size=vocab_size)
        times.append(time.perf_counter() - started)
    print(
        f"\nload (validate + build lookup keys): min {min(times):.2f} s, median {statistics.median(times):.2f} s"
    )
    return mask


# ---------------------------------------------------------------------------------------------- lookups


def report_lookups(mask: CooccurrenceMask, unigram_counts: np.ndarray, repeats: int) -> None:
    rng = np.random.default_rng(0)
    p = unigram_counts / unigram_counts.sum()
    print(f"\nlookup time per grid in ms, min / median over {repeats} draws (ids ~ corpus frequency):")
    for k in KS:
        draws = [[rng.choice(p.size, k, replace=False, p=p) for _ in range(3)] for _ in range(repeats)]
        pair_hits = np.mean([np.count_nonzero(mask.weights(d[:2])) / k**2 for d in draws])
        triple_hits = np.mean([np.count_nonzero(mask.weights(d)) / k**3 for d in draws[:20]])
        print(
            f"  k={k} (stored: {100 * pair_hits:.1f}% of pair cells, {100 * triple_hits:.2f}% of triple cells)"
        )
        _time(f"pair grid {k}x{k}", draws, lambda d: mask.weights(d[:2]))
        _time(f"triple grid {k}x{k}x{k}", draws, lambda d: mask.weights(d))
        survivors = [_surviving_pairs(mask, d, None) for d in draws]
        m = int(np.mean([s[0].size for s in survivors]))
        _time(f"triples of all {m} stored pairs", survivors, lambda s: mask.triple_weights_for_pairs(*s))
        top = [_surviving_pairs(mask, d, k) for d in draws]
        _time(f"triples of the top {k} pairs", top, lambda s: mask.triple_weights_for_pairs(*s))


def _surviving_pairs(mask: CooccurrenceMask, draw: list[np.ndarray], top: int | None):
    """The pairs of a draw's grid with W > 0 (or the `top` largest), as the sampler would keep them."""
    grid = mask.weights(draw[:2])
    cells = np.flatnonzero(grid)
    if top is not None:
        cells = cells[np.argsort(grid.ravel()[cells])[::-1][:top]]
    i, j = np.unravel_index(cells, grid.shape)
    return draw[0][i], draw[1][j], draw[2]


def _time(label: str, inputs: list, fn) -> None:
    times = []
    for x in inputs:
        started = time.perf_counter_ns()
        fn(x)
        times.append((time.perf_counter_ns() - started) / 1e6)
    print(f"    {label}: {min(times):.3f} / {statistics.median(times):.3f}")


if __name__ == "__main__":
    main()
