"""dynamo-data split (issue 20, item 2): a corpus directory by file, or a token file by document, into
train and val; the same input and seed give the same split, every unit lands in exactly one part, and
the output directory appears whole or not at all."""

from __future__ import annotations

import numpy as np
import pytest

from dynamo_export.cli.data import main as data_main
from dynamo_export.data import split_corpus
from dynamo_export.errors import DataError
from dynamo_export.tokens import open_tokens, write_token_file


def _corpus(root, files=20):
    for i in range(files):
        (root / "sub" if i % 2 else root).mkdir(parents=True, exist_ok=True)
        (root / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_text(f"document {i}\n")
    return root


def _parts(out):
    return {part: sorted(p.relative_to(out / part).as_posix() for p in (out / part).rglob("*.txt"))
            for part in ("train", "val")}  # fmt: skip


def test_a_directory_splits_by_file_deterministically(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    counts = split_corpus(corpus, tmp_path / "a", val_fraction=0.2, seed=3)
    assert counts == {"train": 16, "val": 4}
    split_corpus(corpus, tmp_path / "b", val_fraction=0.2, seed=3)
    split_corpus(corpus, tmp_path / "c", val_fraction=0.2, seed=4)
    a = _parts(tmp_path / "a")
    assert a == _parts(tmp_path / "b") and a != _parts(tmp_path / "c")
    every = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.txt"))
    assert sorted(a["train"] + a["val"]) == every  # each file once
    name = a["val"][0]
    assert (tmp_path / "a" / "val" / name).read_text() == (corpus / name).read_text()


def test_a_token_file_splits_by_document_keeping_their_order(tmp_path):
    docs = [np.arange(1 + i, 4 + i) for i in range(10)]  # never the eot id 0
    ids = np.concatenate([np.concatenate([d, [0]]) for d in docs])[:-1]
    write_token_file(tmp_path / "all", ids, 50, eot_id=0)
    assert split_corpus(tmp_path / "all", tmp_path / "out", val_fraction=0.3) == {"train": 7, "val": 3}
    parts = {}
    for part in ("train", "val"):
        part_ids, meta = open_tokens(tmp_path / "out" / part)
        assert part_ids[0] != 0 and part_ids[-1] != 0 and meta.vocab_size == 50
        parts[part] = [
            tuple(d) for d in np.split(np.asarray(part_ids), np.flatnonzero(part_ids == 0)) if len(d)
        ]
        parts[part] = [d[1:] if d[0] == 0 else d for d in parts[part]]
    original = [tuple(d) for d in docs]
    assert sorted(parts["train"] + parts["val"]) == sorted(original)
    assert parts["train"] == [d for d in original if d in parts["train"]]  # original order kept


def test_refusals_name_the_fix(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus", files=1)
    with pytest.raises(DataError, match="at least 2"):
        split_corpus(corpus, tmp_path / "one")
    corpus = _corpus(tmp_path / "corpus", files=4)
    with pytest.raises(DataError, match=r"\(0, 1\)"):
        split_corpus(corpus, tmp_path / "x", val_fraction=1.0)
    split_corpus(corpus, tmp_path / "out")
    with pytest.raises(SystemExit):
        data_main(["split", "--input", str(corpus), "--out", str(tmp_path / "out")])
    assert "--force" in capsys.readouterr().err
    data_main(["split", "--input", str(corpus), "--out", str(tmp_path / "out"), "--force"])


def test_a_failed_split_leaves_nothing_behind(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dynamo_export.data.shutil.copyfile", fail)
    with pytest.raises(OSError):
        split_corpus(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "corpus"]
