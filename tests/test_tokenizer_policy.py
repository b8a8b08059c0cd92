"""tokenizer.json as untrusted input (issue 19, item 1): the allow-list admits what the exporter writes
and what Pythia ships, refuses each class of hostile setting by name, and whatever `tokenizers`
raises (a Rust panic included) comes out as the runtime's typed error."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from runtime import ArtifactError, DynaMoRuntime, InputError
from runtime.manifest import MANIFEST_NAME, inventory, read_manifest
from runtime.tokenizer_policy import TokenizerError, call, load_tokenizer, policy_problems

REFERENCE = Path(__file__).resolve().parents[1] / "artifacts" / "reference-t3" / "tokenizer.json"


def pythia_like() -> dict:
    """The shape of EleutherAI's Pythia tokenizer.json (NFC, byte-level BPE, runs of spaces added)."""
    spec = json.loads(REFERENCE.read_text())
    spec["normalizer"] = {"type": "NFC"}
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    extra = [" " * n for n in range(2, 25)]
    spec["added_tokens"] += [
        {
            "id": 8000 + i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": False,
        }
        for i, s in enumerate(extra)
    ]
    return spec


def test_exporter_and_pythia_tokenizers_pass(tiny_artifact, bpe_models):
    for path in (REFERENCE, tiny_artifact.out / "tokenizer.json", bpe_models / "t3-onnx" / "tokenizer.json"):
        assert policy_problems(json.loads(path.read_text())) == [], path
        assert load_tokenizer(path).encode("def f(x): return x").ids
    assert policy_problems(pythia_like()) == []


def _with(**changes) -> dict:
    spec = json.loads(REFERENCE.read_text())
    for key, value in changes.items():
        if key == "dropout":
            spec["model"]["dropout"] = value
        elif key == "model_type":
            spec["model"]["type"] = value
        else:
            spec[key] = value
    return spec


HOSTILE = {
    "expanding normalizer": (
        _with(normalizer={"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 10**6}),
        "normalizer Replace content",
    ),
    "precompiled charsmap": (
        _with(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
        "normalizer 'Precompiled'",
    ),
    "regex split": (
        _with(
            pre_tokenizer={
                "type": "Split",
                "pattern": {"Regex": "(a+)+$"},
                "behavior": "Isolated",
                "invert": False,
            }
        ),
        "pre_tokenizer Split pattern must be a literal",
    ),
    "nested regex split": (
        _with(
            pre_tokenizer={
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": "x*"}, "behavior": "Removed", "invert": False}
                ],
            }
        ),
        "pre_tokenizer Split pattern",
    ),
    "truncation": (
        _with(truncation={"max_length": 4, "strategy": "LongestFirst", "stride": 0}),
        "truncation is set",
    ),
    "padding": (_with(padding={"length": 512, "pad_id": 0}), "padding is set"),
    "dropout": (_with(dropout=0.1), "dropout 0.1 makes tokens random"),
    "amplifying decoder": (
        _with(decoder={"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 50_000}),
        "decoder Replace content",
    ),
    "prompt-changing post-processor": (
        _with(post_processor={"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}}),
        "post_processor 'TemplateProcessing'",
    ),
    "unknown model": (_with(model_type="Unigram"), "model 'Unigram'"),
    "unknown key": (_with(extension={"x": 1}), "unknown top-level key 'extension'"),
    "huge added token": (
        _with(added_tokens=[{"id": 0, "content": "x" * 10_000, "special": True}]),
        "added tokens are malformed or over",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_setting_is_refused_by_name(case, tmp_path):
    spec, named = HOSTILE[case]
    assert any(named in p for p in policy_problems(spec)), policy_problems(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="holds what the runtime does not run"):
        load_tokenizer(path)


def test_malformed_and_oversized_files_are_typed(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(path)
    path.write_text(REFERENCE.read_text())
    monkeypatch.setattr("runtime.tokenizer_policy.MAX_FILE_BYTES", 1000)
    with pytest.raises(TokenizerError, match="over the 1,000 a tokenizer may take"):
        load_tokenizer(path)


def test_a_rust_panic_becomes_the_runtimes_error():
    class PanicException(BaseException):  # what pyo3 raises: not an Exception
        pass

    def panics():
        raise PanicException("called `Result::unwrap()` on an `Err` value")

    with pytest.raises(InputError, match="the tokenizer failed: PanicException: called"):
        call(panics, "the tokenizer failed", InputError)
    with pytest.raises(KeyboardInterrupt):  # what the user pressed still stops the program
        call(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "x", InputError)


def test_an_artifact_with_a_hostile_tokenizer_is_refused_at_load(tiny_artifact, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(tiny_artifact.out, root)
    spec = json.loads((root / "tokenizer.json").read_text())
    spec["truncation"] = {"max_length": 2, "strategy": "LongestFirst", "stride": 0}
    (root / "tokenizer.json").write_text(json.dumps(spec))
    manifest = read_manifest(root)  # a consistent rehash: what a malicious packager would ship
    (root / MANIFEST_NAME).write_text(dataclasses.replace(manifest, files=inventory(root)).to_json())
    with pytest.raises(ArtifactError, match="truncation is set"):
        DynaMoRuntime.load(root)
