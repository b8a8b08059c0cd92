"""Data pipeline: corpus split, BPE tokenizer, token files, `dynamo-data`, the reference-data script.

Nothing here calls apt: the unpacked package is mocked as a directory tree
with the layout of python3.11-doc.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_export import corpus, data
from dynamo_export.cli.data import main as data_main
from dynamo_export.errors import DataError
from dynamo_export.tokens import dtype_for_vocab, open_tokens

TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "def f(x):\n    return x ** 2  # square\n\n"
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🎉🐍 and tabs\tand\r\nCRLF lines.\n"
) * 20


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(TEXT, encoding="utf-8")
    path = root / "tokenizer.json"
    data.train_tokenizer([root / "a.txt"], vocab_size=320, out=path, show_progress=False)
    return path


def _reference_tokenizer(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True  # literal "<|endoftext|>" in text is text, not the separator
    return tok


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_has_eot_and_the_requested_size(tokenizer_path):
    tok, eot_id = data.load_tokenizer(tokenizer_path)
    assert eot_id == 0 == tok.token_to_id("<|endoftext|>")
    assert tok.get_vocab_size() == 320
    assert json.loads(tokenizer_path.read_text())["pre_tokenizer"]["type"] == "ByteLevel"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_arbitrary_unicode(tokenizer_path, text):
    tok = _reference_tokenizer(tokenizer_path)
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "text", ["", " ", "\x00\x01\x7f", "  leading and trailing  \n", "<|endoftext|>", "💩" * 5, "é\u0301 ﬁ"]
)
def test_tokenizer_round_trips_edge_cases(tokenizer_path, text):
    tok = _reference_tokenizer(tokenizer_path)
    ids = tok.encode(text).ids
    assert 0 not in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_training_is_deterministic(tmp_path, tokenizer_path):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    data.train_tokenizer([tmp_path / "a.txt"], 320, tmp_path / "again.json", show_progress=False)
    assert (tmp_path / "again.json").read_bytes() == tokenizer_path.read_bytes()


def test_train_tokenizer_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="at least 257"):
        data.train_tokenizer([tmp_path / "a.txt"], 100, tmp_path / "t.json")
    with pytest.raises(DataError, match=r"missing\.txt"):
        data.train_tokenizer([tmp_path / "a.txt", tmp_path / "missing.txt"], 300, tmp_path / "t.json")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8"):
        data.train_tokenizer([tmp_path / "latin1.txt"], 300, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON"):
        data.load_tokenizer(tmp_path / "bad.json")
    Tokenizer(models.BPE()).save(str(tmp_path / "no_eot.json"))
    with pytest.raises(DataError, match=r"no <\|endoftext\|>"):
        data.load_tokenizer(tmp_path / "no_eot.json")


# --- tokenization -----------------------------------------------------------------------------------------


def test_tokenize_files_equals_encode_of_each_doc_joined_with_eot(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(data, "_BATCH_DOCS", 2)  # force several encode_batch calls
    docs = ["first document\n", "second with a literal <|endoftext|> inside\n", "", TEXT[:300], "last 🐍"]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8", newline="")
    meta = data.tokenize_files(tokenizer_path, paths, tmp_path / "out", show_progress=False)

    ids, read_meta = open_tokens(tmp_path / "out")
    assert isinstance(ids, np.memmap) and read_meta == meta
    tok = _reference_tokenizer(tokenizer_path)
    expected = []
    for doc in filter(None, docs):  # the empty file is no document
        if expected:
            expected.append(0)
        expected.extend(tok.encode(doc).ids)
    np.testing.assert_array_equal(ids, expected)
    assert (meta.dtype, meta.vocab_size, meta.eot_id) == ("uint16", 320, 0)
    assert int((ids == 0).sum()) == 3  # only separators: the literal eot text stays text


def test_doc_separator_splits_files_across_read_chunks(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(data, "_READ_BYTES", 5)  # separators and multibyte characters straddle reads
    sep = "\n=====\n"
    docs = ["ünï 🎉 one", "two\nlines", "three 日本"]
    (tmp_path / "a.txt").write_text(sep + sep.join(docs[:2]) + sep + sep, encoding="utf-8")
    (tmp_path / "b.txt").write_text(docs[2], encoding="utf-8")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert list(data.iter_documents(files, sep)) == docs

    data.tokenize_files(tokenizer_path, files, tmp_path / "out", separator=sep, show_progress=False)
    ids, _ = open_tokens(tmp_path / "out")
    tok = _reference_tokenizer(tokenizer_path)
    pieces = np.split(np.asarray(ids), np.flatnonzero(ids == 0))
    got = [tok.decode(p[p != 0].tolist(), skip_special_tokens=False) for p in pieces]
    assert got == docs


def test_directory_input_is_every_file_in_sorted_order(tmp_path):
    for rel in ["b/z.txt", "a.txt", "b/a.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert [p.relative_to(tmp_path).as_posix() for p in data.expand_inputs([tmp_path])] == [
        "a.txt",
        "b/a.txt",
        "b/z.txt",
    ]


def test_large_vocabulary_gets_uint32_ids(tmp_path):
    assert (dtype_for_vocab(65_536), dtype_for_vocab(65_537)) == ("uint16", "uint32")
    vocab = {sym: i for i, sym in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"filler{i}": i for i in range(len(vocab), 70_000)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])  # id 70,000: only uint32 holds the separator
    tok.save(str(tmp_path / "big.json"))
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(name)

    meta = data.tokenize_files(
        tmp_path / "big.json", [tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out"
    )
    ids, _ = open_tokens(tmp_path / "out")
    assert (meta.dtype, meta.eot_id, meta.vocab_size) == ("uint32", 70_000, 70_001)
    assert (tmp_path / "out.bin").stat().st_size == 4 * meta.num_tokens
    np.testing.assert_array_equal(ids, [vocab["a"], 70_000, vocab["b"]])


def test_tokenize_errors(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match=r"input not found: .*missing\.txt"):
        data.tokenize_files(tokenizer_path, [tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="no input"):
        data.tokenize_files(tokenizer_path, [], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        data.tokenize_files(tokenizer_path, [tmp_path / "empty.txt"], tmp_path / "out", show_progress=False)
    with pytest.raises(DataError, match="separator must not be empty"):
        data.tokenize_files(tokenizer_path, [tmp_path / "empty.txt"], tmp_path / "out", separator="")
    assert not (tmp_path / "out.bin").exists()


def test_cli_trains_and_tokenizes_with_args_from_a_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\n\nSEP\n\ntwo " + TEXT, encoding="utf-8")
    (tmp_path / "args").write_text(f"--input\n{tmp_path / 'a.txt'}\n")
    data_main(
        ["train-tokenizer", f"@{tmp_path / 'args'}", "--vocab-size", "300", "--out", str(tmp_path / "t.json")]
    )
    tokenize = ["tokenize", "--tokenizer", str(tmp_path / "t.json"), f"@{tmp_path / 'args'}"]
    data_main([*tokenize, "--out", str(tmp_path / "out"), "--doc-separator", "\n\nSEP\n\n"])
    ids, meta = open_tokens(tmp_path / "out")
    assert meta.vocab_size == 300 and int((ids == 0).sum()) == 1
    assert "vocab size 300" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        data_main(["tokenize", "--tokenizer", str(tmp_path / "none.json"), "--input", "x", "--out", "y"])
    assert exc.value.code == 2
    assert "none.json not found" in capsys.readouterr().err


# --- corpus -----------------------------------------------------------------------------------------------


def test_split_is_deterministic_by_name_and_holds_three_percent():
    paths = [f"library/mod{i}.rst.txt" for i in range(1000)]
    train, heldout = corpus.split_paths(paths)
    assert len(heldout) == 30 and len(train) == 970
    assert sorted(train + heldout) == sorted(paths) and train == sorted(train)
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    assert corpus.split_paths(shuffled) == (train, heldout)
    # Pinned so that a change of rule, which would silently move files across the split, fails here.
    assert corpus.split_paths([f"doc{i}.rst.txt" for i in range(100)])[1] == [
        "doc0.rst.txt",
        "doc51.rst.txt",
        "doc79.rst.txt",
    ]


def _mock_unpacked_package(root: Path, num_files: int = 40) -> list[str]:
    sources = root / corpus.SOURCES_DIR
    rels = [f"{('library', 'c-api', 'howto')[i % 3]}/page{i}.rst.txt" for i in range(num_files)]
    for i, rel in enumerate(rels):
        (sources / rel).parent.mkdir(parents=True, exist_ok=True)
        (sources / rel).write_text(f"Page {i}\n=======\n\nText of page {i} — ünïcode.\n", encoding="utf-8")
    (sources / "library" / "notes.txt").write_text("not a doc source")  # ignored: not *.rst.txt
    return sorted(rels)


def test_build_corpus_splits_verifies_and_detects_tampering(tmp_path, monkeypatch):
    rels = _mock_unpacked_package(tmp_path / "pkg")
    manifest = corpus.build_corpus(tmp_path / "pkg", tmp_path / "corpus", {"package": "p", "version": "1"})
    train = [e["path"] for e in manifest["splits"]["train"]]
    heldout = [e["path"] for e in manifest["splits"]["heldout"]]
    assert (train, heldout) == corpus.split_paths(rels) and len(heldout) == 1

    assert corpus.verified_manifest(tmp_path / "corpus") == manifest
    files = corpus.split_files(tmp_path / "corpus", "heldout")
    src = tmp_path / "pkg" / corpus.SOURCES_DIR / heldout[0]
    assert (
        files == [tmp_path / "corpus" / "heldout" / heldout[0]] and files[0].read_bytes() == src.read_bytes()
    )

    files[0].write_text("edited")
    assert corpus.verified_manifest(tmp_path / "corpus") is None
    files[0].write_bytes(src.read_bytes())
    monkeypatch.setattr(corpus, "HELDOUT_PERCENT", 10)  # a corpus split by another rule is stale
    assert corpus.verified_manifest(tmp_path / "corpus") is None
    with pytest.raises(DataError, match="not a complete corpus"):
        corpus.split_files(tmp_path / "corpus", "train")


def test_collect_sources_rejects_a_directory_that_is_not_the_package(tmp_path):
    with pytest.raises(DataError, match=r"not an unpacked python3\.11-doc"):
        corpus.collect_sources(tmp_path)


def _fake_apt(monkeypatch, calls: list, fail_first_download: bool = False):
    """Stand in for apt-get/dpkg: `dpkg -x` lays out a mock package."""

    def run(cmd, cwd):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            if fail_first_download and calls.count(["apt-get", "download"]) == 1:
                raise DataError("E: Unable to locate package")
            (cwd / "python3.11-doc_3.11.2-6_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg-deb":
            return "3.11.2-6\n"
        elif cmd[:2] == ["dpkg", "-x"]:
            _mock_unpacked_package(cwd / cmd[3])
        return ""

    monkeypatch.setattr(corpus, "_run", run)


def test_fetch_corpus_updates_lists_once_then_resumes_without_apt(tmp_path, monkeypatch):
    calls: list = []
    _fake_apt(monkeypatch, calls, fail_first_download=True)
    manifest = corpus.fetch_corpus(tmp_path / "corpus")
    apt = [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert calls == [*apt, ["dpkg-deb", "--field"], ["dpkg", "-x"]]
    assert manifest["version"] == "3.11.2-6" and manifest["split_rule"] == corpus.SPLIT_RULE

    calls.clear()
    assert corpus.fetch_corpus(tmp_path / "corpus") == manifest
    assert calls == []


def test_reference_data_script_builds_then_skips_finished_steps(tmp_path, monkeypatch, capsys):
    from scripts import reference_data

    _fake_apt(monkeypatch, [])
    summary = reference_data.build_reference_data(tmp_path / "ref", vocab_size=300)
    assert {s: v["files"] for s, v in summary.items()} == {"train": 39, "heldout": 1}
    ids, meta = open_tokens(tmp_path / "ref" / "train")
    assert meta.num_tokens == summary["train"]["tokens"] and int((ids == 0).sum()) == 38

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(reference_data, "train_tokenizer", must_not_run)
    monkeypatch.setattr(reference_data, "tokenize_files", must_not_run)
    assert reference_data.build_reference_data(tmp_path / "ref", vocab_size=300) == summary
    (tmp_path / "ref" / "heldout.bin").write_bytes(b"")  # a damaged output reruns its step
    with pytest.raises(AssertionError, match="ran again"):
        reference_data.build_reference_data(tmp_path / "ref", vocab_size=300)
