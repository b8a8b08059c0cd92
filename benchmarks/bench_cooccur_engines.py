"""dynamo-cooccur's two engines on one synthetic token file: wall time and peak memory side by side.

    python -m benchmarks.bench_cooccur_engines [--tokens 100000000] [--repeats 1] [--spark-master local[2]]

The token file is real text re-sampled by document: the reference corpus's training token
file (data/reference/train, from `make reference-data` or `python -m scripts.reference_model
--stop-after data`) is cut into documents at its eot ids, and the documents are joined again
in random order (a fresh seeded permutation per pass over them) until the file holds
--tokens tokens. Shards therefore look like text of that corpus, but the set of distinct
n-grams saturates at the source's: a real corpus of the same size has more, so the reduce
side and the output are smaller than they would be. --relabel bounds that from the other
side: every pass over the documents maps the ids (eot kept) through a fresh random
permutation, so each pass brings n-grams of its own, and the distinct n-grams grow in
proportion to the size (unigram counts flatten: W changes, the costs hardly).

Each run is `python -m dynamo_export.cli.cooccur` in a child process, so nothing is shared
between runs. A sampler thread reads the RSS of every process in the child's tree every
0.1 s (psutil) and keeps, per group, the peak of the group's sum: the driver (the CLI's
own Python), the JVM (Spark's driver and, in local mode, its executor) and the workers
(the local engine's spawned processes, or Spark's Python daemon and workers). "tree" is
the peak of the whole sum at one instant. RSS counts a page shared between processes (a
forked worker's, a memory-mapped token file's) once per process, so the sums overstate.
The two engines' outputs are compared array for array after the first repeat.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse

from dynamo_export.tokens import open_tokens, write_token_file

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("driver", "jvm", "workers")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the synthetic file")
    parser.add_argument(
        "--source", default=str(ROOT / "data/reference/train"), help="token file to re-sample"
    )
    parser.add_argument("--relabel", action="store_true", help="fresh id permutation per pass (see above)")
    parser.add_argument("--work", default="/tmp/dynamo-bench-engines", help="work directory (file, outputs)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine (min and median reported)")
    parser.add_argument("--workers", type=int, default=None, help="local engine's worker processes")
    parser.add_argument("--spark-master", default="local[2]", help="Spark master for the spark engine")
    parser.add_argument(
        "--spark-conf", action="append", default=[], help="extra KEY=VALUE for Spark (repeatable)"
    )
    parser.add_argument("--engines", default="local,spark", help="which engines, comma-separated")
    args = parser.parse_args()
    work = Path(args.work)
    tokens = synthetic_token_file(Path(args.source), args.tokens, work, args.relabel)
    meta = open_tokens(tokens)[1]
    print(f"token file {tokens}: {meta.num_tokens:,} tokens, vocab {meta.vocab_size}")

    results: dict[str, list[Run]] = {}
    for repeat in range(args.repeats):
        for engine in args.engines.split(","):
            options = ["--workers", str(args.workers)] if engine == "local" and args.workers else []
            if engine == "spark":
                options = ["--engine", "spark", "--spark-master", args.spark_master]
                for setting in ["spark.ui.showConsoleProgress=false", *args.spark_conf]:
                    options += ["--spark-conf", setting]
            run = run_cli(tokens, work / f"out-{engine}", options)
            results.setdefault(engine, []).append(run)
            print(
                f"  {engine} run {repeat + 1}: {run.wall:.1f} s, tree peak {run.peak['tree'] / 2**20:.0f} MB"
            )
            print(f"    {run.wrote}")
            if run.stages:
                print("\n".join("    " + line for line in run.stages.splitlines()))
    if {"local", "spark"} <= set(results):
        compare(work / "out-local", work / "out-spark")
    print_table(results, meta.num_tokens)


# ---------------------------------------------------------------------------------------------- the file


def synthetic_token_file(source: Path, size: int, work: Path, relabel: bool) -> Path:
    """`source`'s documents in random order, repeated until `size` tokens (cached by size)."""
    out = work / f"resampled-{size}{'-relabelled' if relabel else ''}"
    if out.with_suffix(".json").is_file():
        return out
    if not source.with_suffix(".json").is_file():
        raise SystemExit(f"{source}.json not found: build it with `make reference-data`, or pass --source")
    ids, meta = open_tokens(source)
    ids = np.asarray(ids)
    ends = np.flatnonzero(ids == meta.eot_id)
    starts = np.r_[0, ends + 1]
    stops = np.r_[ends, ids.size]  # documents without their eot
    docs = [ids[a:b] for a, b in zip(starts, stops, strict=True) if b > a]
    rng = np.random.default_rng(0)
    eot = np.array([meta.eot_id], dtype=ids.dtype)
    pieces, total, labels = [], 0, np.arange(meta.vocab_size, dtype=ids.dtype)
    while total < size:
        if relabel and total:  # the first pass keeps the real ids
            labels = rng.permutation(meta.vocab_size).astype(ids.dtype)
            swap = np.flatnonzero(labels == meta.eot_id)[0]
            labels[[swap, meta.eot_id]] = labels[[meta.eot_id, swap]]  # eot stays eot
        for i in rng.permutation(len(docs)):
            pieces += [labels[docs[i]], eot]
            total += docs[i].size + 1
            if total >= size:
                break
    joined = np.concatenate(pieces)[:size]
    del pieces
    print(f"writing {out}: {size:,} tokens from {len(docs):,} documents of {source} ({ids.size:,} tokens)")
    write_token_file(out, joined, meta.vocab_size, meta.eot_id, meta.tokenizer_fingerprint)
    return out


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    wall: float
    peak: dict[str, int] = field(default_factory=dict)  # group -> bytes
    wrote: str = ""  # the CLI's last line: tokens, vocabulary, n-grams written
    stages: str = ""  # the spark engine's stage table
    phases_total: float | None = None  # the spark engine's own total of its phases


def run_cli(tokens: Path, out: Path, options: list[str]) -> Run:
    command = [sys.executable, "-m", "dynamo_export.cli.cooccur", "--tokens", str(tokens), "--out", str(out)]
    command += ["--force", *options]
    started = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = Sampler(process)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    run = Run(wall, sampler.peak, wrote=stdout.strip().splitlines()[-1])
    if "Spark stages:" in stderr:
        run.stages = stderr[stderr.index("Spark stages:") :].strip()
        found = re.search(r"total: .*, ([\d.]+) s", run.stages)
        run.phases_total = float(found[1]) if found else None
    return run


class Sampler:
    """Peak RSS per process group of a process tree, sampled every 0.1 s on a thread."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.peak = dict.fromkeys((*GROUPS, "tree"), 0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.is_set():
            self._sample()
            time.sleep(0.1)

    def _sample(self) -> None:
        sums = dict.fromkeys(GROUPS, 0)
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in [self.root, *children]:
            try:
                rss = proc.memory_info().rss
                group = "driver" if proc.pid == self.root.pid else _group(proc)
            except psutil.Error:  # it ended between the listing and the read
                continue
            sums[group] += rss
        for group, value in sums.items():
            self.peak[group] = max(self.peak[group], value)
        self.peak["tree"] = max(self.peak["tree"], sum(sums.values()))


def _group(proc: psutil.Process) -> str:
    if proc.name() == "java":
        return "jvm"
    if proc.name() in ("bash", "sh") and not any(p.name() == "java" for p in proc.parents()):
        return "jvm"  # pyspark's spark-submit launcher script, which starts java
    return "workers"  # the local engine's processes, or Spark's Python daemon and workers


# ---------------------------------------------------------------------------------------------- report


def compare(a: Path, b: Path) -> None:
    same = (a / "cooccurrence.json").read_bytes() == (b / "cooccurrence.json").read_bytes()
    for name in ("pairs.npz", "triples.npz"):
        x, y = scipy.sparse.load_npz(a / name), scipy.sparse.load_npz(b / name)
        same &= x.shape == y.shape and all(
            np.array_equal(getattr(x, f), getattr(y, f)) for f in ("indptr", "indices", "data")
        )
    print(f"outputs identical (arrays and cooccurrence.json): {same}")
    if not same:
        raise SystemExit("the engines disagree")


def print_table(results: dict[str, list[Run]], num_tokens: int) -> None:
    print(
        f"\n{num_tokens:,} tokens, orders 2,3, min_count 1 ({len(next(iter(results.values())))} run(s) each)"
    )
    head = "| engine | wall min (s) | wall median (s) | Mtok/s | peak RSS MB: driver | JVM | workers | tree |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for engine, runs in results.items():
        walls = [r.wall for r in runs]
        peaks = [max(r.peak[g] for r in runs) / 2**20 for g in (*GROUPS, "tree")]
        print(
            f"| {engine} | {min(walls):.1f} | {statistics.median(walls):.1f} | {num_tokens / 1e6 / min(walls):.2f} | "
            + " | ".join(f"{p:,.0f}" for p in peaks)
            + " |"
        )
    spark = results.get("spark", [])
    if spark and spark[0].phases_total:
        phases = min(r.phases_total or 0 for r in spark)
        print(f"(spark: its phases took {phases:.1f} s of that; the rest starts and stops the JVM)")


if __name__ == "__main__":
    main()
