"""`dynamo-cooccur --engine spark` against the local engine, on a real token file, in Spark's local[2] mode.

The corpus is real: a few standard-library modules, one document each, tokenized with a
BPE trained on them (as tests/conftest.py's bpe_models does), so pairs and triples repeat
the way they do in text. One SparkContext serves the whole module (its JVM takes ~5 s to
start); the tests that run Spark jobs are marked slow.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

from dynamo_export import cooccurrence_spark
from dynamo_export.cli.cooccur import main as cooccur_main
from dynamo_export.cooccurrence import build_cooccurrence
from dynamo_export.cooccurrence_spark import build_cooccurrence_spark, count_weights_spark, resolve_sources
from dynamo_export.data import tokenize_files, train_tokenizer
from dynamo_export.errors import TokenFileError
from dynamo_export.spark_session import (
    JavaNotFoundError,
    SparkConfError,
    SparkEngineError,
    SparkExtraMissing,
    SparkRun,
    check_java,
    java_problem,
    parse_spark_conf,
    spark_context,
)
from dynamo_export.tokens import open_tokens, write_token_file

DOCUMENTS = ("argparse", "json.decoder", "json.encoder", "textwrap", "shlex", "string", "fractions", "csv")
SPARK_INSTALL = 'pip install "dynamo-export[spark]"'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A token file of real text: each module's source one document, a 1000-entry BPE trained on them."""
    root = tmp_path_factory.mktemp("spark-corpus")
    files = [Path(importlib.import_module(name).__file__) for name in DOCUMENTS]
    train_tokenizer(files, 1000, root / "tokenizer.json", show_progress=False)
    tokenize_files(root / "tokenizer.json", files, root / "corpus", show_progress=False)
    return root / "corpus"


@pytest.fixture(scope="module")
def spark():
    """One SparkContext for the module, as the CLI starts it (the UI stays on: the stage table reads it)."""
    with spark_context("local[2]", ["spark.ui.showConsoleProgress=false"], progress=False) as sc:
        yield sc


@pytest.fixture(scope="module")
def local_masks(corpus, tmp_path_factory):
    """The local engine's directories for (orders, min_count), built once each."""
    root, built = tmp_path_factory.mktemp("local-masks"), {}

    def get(orders=(2, 3), min_count=1):
        if (orders, min_count) not in built:
            out = root / f"{''.join(map(str, orders))}-min{min_count}"
            build_cooccurrence(corpus, out, orders, min_count, workers=1, shard_tokens=30_011, progress=False)
            built[orders, min_count] = out
        return built[orders, min_count]

    return get


def assert_same_directory(spark_dir: Path, local_dir: Path) -> None:
    """Same sparse structure exactly, same weights, byte-identical cooccurrence.json."""
    meta = json.loads((local_dir / "cooccurrence.json").read_text())
    assert (spark_dir / "cooccurrence.json").read_bytes() == (local_dir / "cooccurrence.json").read_bytes()
    assert {p.name for p in spark_dir.iterdir()} == {p.name for p in local_dir.iterdir()}
    for name in ("pairs.npz", "triples.npz")[: len(meta["orders"])]:
        ours, theirs = scipy.sparse.load_npz(spark_dir / name), scipy.sparse.load_npz(local_dir / name)
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours.indptr, theirs.indptr)
        np.testing.assert_array_equal(ours.indices, theirs.indices)
        assert ours.indices.dtype == theirs.indices.dtype and ours.data.dtype == theirs.data.dtype
        np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-7, atol=0)  # in fact bit-identical today
    assert meta["nnz"]["2"] > 1000  # a real corpus, not a degenerate one


# ---------------------------------------------------------------------------------------------- equal output


@pytest.mark.slow
def test_spark_writes_the_local_engines_directory(spark, corpus, local_masks, tmp_path, capsys):
    # Other shards and more key ranges than the local engine's: the result must not depend on them.
    # (Few tasks all the same: each costs ~0.1 s in local mode.)
    meta = build_cooccurrence_spark(
        corpus, tmp_path / "spark", shard_tokens=16_411, reduce_keys=20_000, progress=True, sc=spark
    )
    assert_same_directory(tmp_path / "spark", local_masks())
    assert meta.num_tokens == open_tokens(corpus)[1].num_tokens
    err = capsys.readouterr().err
    assert f"UI {spark.uiWebUrl}" in err
    for phase in ("first pass", "count n-grams", "fetch the ranges", "write the directory", "total:"):
        assert phase in err, phase
    assert "partitionBy at cooccurrence_spark.py" in err  # the map stage, with its shuffle bytes
    assert not spark.statusTracker().getActiveJobsIds()


@pytest.mark.slow
def test_several_files_globs_and_urls_count_as_their_concatenation(
    spark, corpus, local_masks, tmp_path, monkeypatch, capsys
):
    """Files cut at document ends count as the one file: an n-gram never crossed an eot anyway."""
    # Ranges come back in several records, the records in several fetch jobs: reassembled in order.
    monkeypatch.setattr(cooccurrence_spark, "_RECORD_ENTRIES", 1000)
    monkeypatch.setattr(cooccurrence_spark, "_FETCH_ENTRIES", 1)  # a job per key range
    ids, meta = open_tokens(corpus)
    ends = np.flatnonzero(np.asarray(ids) == meta.eot_id)
    cuts = [0, ends[2] + 1, ends[5] + 1, ids.size]
    parts = tmp_path / "parts"
    for i, (a, b) in enumerate(pairwise(cuts)):
        write_token_file(
            parts / f"part-{i}", ids[a:b], meta.vocab_size, meta.eot_id, meta.tokenizer_fingerprint
        )
    tokens = [f"file://{parts}/part-0", str(parts / "part-[12].bin")]  # a URL, and a glob for two more
    assert [s.url for s in resolve_sources(tokens)] == [f"{parts}/part-{i}.bin" for i in range(3)]
    build_cooccurrence_spark(
        tokens, tmp_path / "spark", min_count=2, shard_tokens=8_192, reduce_keys=20_000, sc=spark
    )
    assert_same_directory(tmp_path / "spark", local_masks(min_count=2))
    err = capsys.readouterr().err
    ranges = re.search(r"key ranges: 2-grams (\d+), 3-grams (\d+)", err)
    assert f"{int(ranges[1]) + int(ranges[2])} stages like runJob" in err


@pytest.mark.slow
def test_pairs_only_and_degenerate_corpora(spark, corpus, local_masks, tmp_path):
    build_cooccurrence_spark(corpus, tmp_path / "pairs", orders=(2,), min_count=3, progress=False, sc=spark)
    assert_same_directory(tmp_path / "pairs", local_masks(orders=(2,), min_count=3))
    for name, ids in (("empty", []), ("eots", [0, 0, 0])):
        write_token_file(tmp_path / name, np.asarray(ids, dtype=np.int64), vocab_size=3, eot_id=0)
        build_cooccurrence(tmp_path / name, tmp_path / f"{name}-local", workers=1, progress=False)
        build_cooccurrence_spark(tmp_path / name, tmp_path / f"{name}-spark", progress=False, sc=spark)
        local, ours = (
            json.loads((tmp_path / f"{name}-{e}/cooccurrence.json").read_text()) for e in ("local", "spark")
        )
        assert ours == local and ours["nnz"] == {"2": 0, "3": 0}


@pytest.mark.slow
def test_cli_engine_spark(spark, corpus, local_masks, tmp_path, monkeypatch, capsys):
    started = {}

    @contextmanager
    def shared_context(master, spark_conf, progress):  # one JVM per process: reuse the module's
        started.update(master=master, spark_conf=list(spark_conf), progress=progress)
        yield spark

    monkeypatch.setattr(cooccurrence_spark, "spark_context", shared_context)
    out = tmp_path / "cli"
    argv = ["--tokens", str(corpus), "--out", str(out), "--engine", "spark", "--min-count", "2"]
    cooccur_main([*argv, "--spark-master", "local[2]", "--spark-conf", "spark.executor.memory=1g"])
    assert started == {"master": "local[2]", "spark_conf": ["spark.executor.memory=1g"], "progress": True}
    assert_same_directory(out, local_masks(min_count=2))
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "Spark stages:" in captured.err
    cooccur_main([*argv, "--force"])
    assert started["master"] == "local[*]" and started["spark_conf"] == []


@pytest.mark.slow
def test_a_failed_task_is_one_typed_line(spark, corpus, tmp_path):
    write_token_file(tmp_path / "shrinks", open_tokens(corpus)[0][:5000], 1000, 0)
    sources = resolve_sources(tmp_path / "shrinks")
    with open(tmp_path / "shrinks.bin", "r+b") as f:  # the file changes after its header was read
        f.truncate(4000)
    with pytest.raises(
        SparkEngineError, match=r"failed: .*TokenFileError: .*changed since its header was read"
    ):
        count_weights_spark(SparkRun(spark, progress=False), sources, shard_tokens=1000)


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_spark_conf_is_a_typed_error(corpus, tmp_path, capsys):
    assert parse_spark_conf(["spark.executor.memory=8g", "spark.hadoop.fs.s3a.endpoint=http://x:9000"]) == {
        "spark.executor.memory": "8g",
        "spark.hadoop.fs.s3a.endpoint": "http://x:9000",
    }
    with pytest.raises(
        SparkConfError, match=r"'spark.executor.memory', 'executor.cores=2', 'spark.master=yarn'"
    ):
        parse_spark_conf(
            ["spark.executor.memory", "executor.cores=2", "spark.master=yarn", "spark.ui.port=4050"]
        )
    argv = [
        "--tokens",
        str(corpus),
        "--out",
        str(tmp_path / "m"),
        "--engine",
        "spark",
        "--spark-conf",
        "oops",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cooccur_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dynamo-cooccur: error: --spark-conf takes KEY=VALUE")
    assert not (tmp_path / "m").exists()


def test_missing_java_is_a_typed_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert "found no java on JAVA_HOME=" in java_problem()
    with pytest.raises(JavaNotFoundError, match=r"needs Java 17\+ .*openjdk-17"):
        build_cooccurrence_spark(corpus, tmp_path / "m", master="local[1]", progress=False)
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "found no java on PATH" in java_problem()
    old = tmp_path / "java"  # a Java 11 on PATH
    old.write_text("#!/bin/sh\necho 'openjdk version \"11.0.22\" 2024-01-16' >&2\n")
    old.chmod(0o755)
    with pytest.raises(JavaNotFoundError, match=r"is Java 11"):
        check_java()
    old.write_text("#!/bin/sh\necho 'java version \"1.8.0_402\"' >&2\n")
    assert "is Java 8" in java_problem()


def test_missing_pyspark_names_the_extra(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark now fails as if not installed
    with pytest.raises(SparkExtraMissing, match="module 'pyspark' is missing"):
        build_cooccurrence_spark(corpus, tmp_path / "m", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        cooccur_main(["--tokens", str(corpus), "--out", str(tmp_path / "m"), "--engine", "spark"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(SPARK_INSTALL)


def test_cli_refuses_options_the_engine_would_ignore(corpus, tmp_path, capsys):
    out = ["--out", str(tmp_path / "m")]
    for argv, message in (
        (["--tokens", str(corpus), str(corpus), *out], "--engine local counts one token file, got 2"),
        (["--tokens", str(corpus), *out, "--spark-conf", "spark.a=b"], "--spark-conf need --engine spark"),
        (
            ["--tokens", str(corpus), *out, "--engine", "spark", "--workers", "2"],
            "--workers is --engine local's",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cooccur_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_token_files_must_agree(corpus, tmp_path):
    ids, meta = open_tokens(corpus)
    write_token_file(tmp_path / "other-vocab", ids[:100], meta.vocab_size + 1, meta.eot_id)
    with pytest.raises(TokenFileError, match="vocab_size"):
        resolve_sources([corpus, tmp_path / "other-vocab"])
    with pytest.raises(TokenFileError, match="no file matches"):
        resolve_sources([str(tmp_path / "nothing-*.bin")])
    with pytest.raises(TokenFileError, match="not found"):
        resolve_sources([tmp_path / "absent"])
