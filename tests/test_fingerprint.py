"""Tokenizer fingerprints (issue 20, item 1): two tokenizers of the same vocabulary size pass every size
check, so token files, checkpoints, masks and artifacts record which tokenizer they belong to, and every
command that combines two of them refuses a mismatch in one line naming both and the fix. Files from
before fingerprints (none recorded) are still accepted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from converters.artifact import export_artifact
from converters.cli import main as export_main
from dynamo_export.checkpoint import checkpoint_fingerprint
from dynamo_export.cli.cooccur import main as cooccur_main
from dynamo_export.cli.eval import main as eval_main
from dynamo_export.cli.train import main as train_main
from dynamo_export.data import split_corpus, tokenize_files, train_tokenizer
from dynamo_export.tokens import read_token_meta, write_token_file
from runtime import DynaMoRuntime
from runtime.errors import TokenizerMismatchError
from runtime.fingerprint import fingerprint_of_json, tokenizer_fingerprint
from runtime.manifest import MANIFEST_NAME, file_entry, read_manifest
from tests.conftest import TINY_VOCAB, _python_sources_text, _write_cooccurrence

BPE_VOCAB = 300


@pytest.fixture(scope="module")
def two_bpe(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two byte-level BPE tokenizers of exactly BPE_VOCAB entries trained on different text, and a text file."""
    root = tmp_path_factory.mktemp("two-bpe")
    source = _python_sources_text()
    half = len(source) // 2
    (root / "a.txt").write_text(source[:half])
    (root / "b.txt").write_text(source[half:].upper())  # other text, other merges
    for name in ("a", "b"):
        tokenizer = train_tokenizer(
            [root / f"{name}.txt"], BPE_VOCAB, root / f"{name}.json", show_progress=False
        )
        assert tokenizer.get_vocab_size() == BPE_VOCAB
    return root / "a.json", root / "b.json", root / "a.txt"


@pytest.fixture(scope="module")
def other_word_level(tmp_path_factory) -> Path:
    """A word-level tokenizer of the tiny models' size whose ids mean other words than theirs (t0..t99)."""
    path = tmp_path_factory.mktemp("other-tokenizer") / "tokenizer.json"
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(TINY_VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


def _one_line(message: str) -> str:
    assert message.count("\n") <= 1 and message.strip(), message
    return message


def test_the_fingerprint_ignores_formatting_but_not_content(two_bpe, tmp_path):
    a, b, _ = two_bpe
    raw = json.loads(a.read_text())
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(raw, separators=(",", ":"), sort_keys=True))
    assert tokenizer_fingerprint(compact) == tokenizer_fingerprint(a)
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer): the same merges
    spelled = json.loads(json.dumps(raw))
    spelled["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    assert fingerprint_of_json(spelled) == tokenizer_fingerprint(a)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)  # same size, other tokens
    swapped = json.loads(json.dumps(raw))
    vocab = swapped["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[1:3]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids exchange their text
    assert fingerprint_of_json(swapped) != tokenizer_fingerprint(a)


def test_token_files_and_their_splits_record_the_fingerprint(two_bpe, tmp_path):
    a, _, text = two_bpe
    meta = tokenize_files(a, [text], tmp_path / "tokens", separator="\n\n", show_progress=False)
    assert meta.tokenizer_fingerprint == tokenizer_fingerprint(a)
    assert read_token_meta(tmp_path / "tokens").tokenizer_fingerprint == tokenizer_fingerprint(a)
    split_corpus(tmp_path / "tokens", tmp_path / "split", val_fraction=0.2, seed=0)
    for part in ("train", "val"):
        assert read_token_meta(tmp_path / "split" / part).tokenizer_fingerprint == tokenizer_fingerprint(a)


def test_cooccur_refuses_a_tokenizer_other_than_the_token_files(two_bpe, tmp_path, capsys):
    a, b, text = two_bpe
    tokenize_files(a, [text], tmp_path / "tokens", show_progress=False)
    args = ["--tokens", str(tmp_path / "tokens"), "--workers", "1"]
    with pytest.raises(SystemExit) as exited:
        cooccur_main([*args, "--out", str(tmp_path / "cooc-b"), "--tokenizer", str(b)])
    assert exited.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert "tokenizer mismatch" in err and str(tmp_path / "tokens") in err and str(b) in err
    assert "dynamo-data tokenize" in err and not (tmp_path / "cooc-b").exists()
    cooccur_main([*args, "--out", str(tmp_path / "cooc-a"), "--tokenizer", str(a)])  # its own: accepted
    meta = json.loads((tmp_path / "cooc-a" / "cooccurrence.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(a)


def test_checkpoints_record_their_tokenizer(tiny_dynamo_dir, tiny_gpt_neox_dir):
    expected = tokenizer_fingerprint(tiny_gpt_neox_dir / "tokenizer.json")
    assert checkpoint_fingerprint(tiny_dynamo_dir) == expected
    assert json.loads((tiny_dynamo_dir / "config.json").read_text())["tokenizer_fingerprint"] == expected


def test_eval_refuses_tokens_of_another_tokenizer_of_the_same_size(
    tiny_dynamo_dir, other_word_level, tmp_path
):
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, 400)
    other = tokenizer_fingerprint(other_word_level)
    write_token_file(tmp_path / "other", ids, TINY_VOCAB, eot_id=0, tokenizer_fingerprint=other)
    with pytest.raises(SystemExit) as exited:
        eval_main(["--model", str(tiny_dynamo_dir), "--tokens", str(tmp_path / "other"), "--no-progress"])
    message = _one_line(str(exited.value.code))
    assert "tokenizer mismatch" in message and str(tiny_dynamo_dir) in message
    assert str(tmp_path / "other") in message and "dynamo-data tokenize --tokenizer" in message
    # a token file from before fingerprints is unknown, and accepted
    write_token_file(tmp_path / "old", ids, TINY_VOCAB, eot_id=0)
    eval_main(["--model", str(tiny_dynamo_dir), "--tokens", str(tmp_path / "old"), "--seq-len", "32",
               "--max-batches", "1", "--no-progress"])  # fmt: skip


def test_train_refuses_tokens_of_another_tokenizer(tiny_dynamo_dir, other_word_level, tmp_path):
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, 400)
    write_token_file(
        tmp_path / "train", ids, TINY_VOCAB, 0, tokenizer_fingerprint=tokenizer_fingerprint(other_word_level)
    )
    args = [
        "--model",
        str(tiny_dynamo_dir),
        "--train",
        str(tmp_path / "train"),
        "--val",
        str(tmp_path / "train"),
    ]
    with pytest.raises(SystemExit) as exited:
        train_main([*args, "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"])
    message = _one_line(str(exited.value.code))
    assert "tokenizer mismatch" in message and str(tmp_path / "train") in message
    write_token_file(tmp_path / "old", ids, TINY_VOCAB, eot_id=0)  # no fingerprint: only --tokenizer decides
    with pytest.raises(SystemExit) as exited:
        train_main(["--model", str(tiny_dynamo_dir), "--train", str(tmp_path / "old"), "--val", str(tmp_path / "old"),
                    "--tokenizer", str(other_word_level), "--out", str(tmp_path / "out2"), "--steps", "1"])  # fmt: skip
    message = _one_line(str(exited.value.code))
    assert "tokenizer mismatch" in message and f"--tokenizer {other_word_level.parent}" in message


def test_export_refuses_masks_of_another_tokenizer(tiny_dynamo_dir, other_word_level, tmp_path, capsys):
    masks = tmp_path / "masks"
    _write_cooccurrence(masks, TINY_VOCAB)
    meta = json.loads((masks / "cooccurrence.json").read_text())
    meta["tokenizer_fingerprint"] = tokenizer_fingerprint(other_word_level)
    (masks / "cooccurrence.json").write_text(json.dumps(meta))
    out = tmp_path / "artifact"
    code = export_main(["--model", str(tiny_dynamo_dir), "--cooccurrence", str(masks), "--out", str(out)])
    assert code == 2
    err = _one_line(capsys.readouterr().err)
    assert "tokenizer mismatch" in err and str(tiny_dynamo_dir) in err and str(masks) in err
    assert "dynamo-cooccur" in err and not out.exists()


def test_the_runtime_refuses_masks_of_another_tokenizer(tiny_artifact, other_word_level, tmp_path):
    root = tmp_path / "artifact"
    shutil.copytree(tiny_artifact.out, root)
    manifest = read_manifest(root)
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(root / "tokenizer.json")
    DynaMoRuntime.load(root)  # its own masks (recorded as unknown here) load

    # a hand-assembled artifact: masks of another tokenizer, every hash in the manifest made to fit
    meta_path = root / "cooccurrence" / "cooccurrence.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_fingerprint"] = tokenizer_fingerprint(other_word_level)
    meta_path.write_text(json.dumps(meta))
    raw = json.loads((root / MANIFEST_NAME).read_text())
    entry = file_entry(meta_path)
    raw["files"]["cooccurrence/cooccurrence.json"] = {"size": entry.size, "sha256": entry.sha256}
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(TokenizerMismatchError) as raised:
        DynaMoRuntime.load(root)
    message = _one_line(str(raised.value))
    assert str(root) in message and "cooccurrence" in message and "dynamo-export --cooccurrence" in message

    # a manifest from before fingerprints: unknown, accepted
    del raw["tokenizer_fingerprint"]
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    assert read_manifest(root).tokenizer_fingerprint is None
    DynaMoRuntime.load(root)


def test_an_export_records_the_fingerprint_in_its_manifest(tiny_gpt_neox_dir, tmp_path):
    result = export_artifact(tiny_gpt_neox_dir, out=tmp_path / "base", verify=False, progress=False)
    assert result.manifest.tokenizer_fingerprint == tokenizer_fingerprint(
        tiny_gpt_neox_dir / "tokenizer.json"
    )
