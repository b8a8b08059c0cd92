"""Shared fixtures: tiny random checkpoints and one exported artifact per test session.

The models are tiny (hidden 32, 4 attention heads, 3 layers, vocab 100,
rotary_pct 0.25), random and seeded, so everything here is fast and deterministic.
Exporting takes 10-20 s even for them (torch.export), hence session scope.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

TINY_VOCAB = 100
TINY_HEADS = 3  # DynaMo-T3


def tiny_gpt_neox_config() -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=64,
        rotary_pct=0.25,
        max_position_embeddings=128,
        # 5x the default spread: logits get margins like a trained model's, so top-1 agreement
        # under fp16/int8 measures rounding, not ties between near-equal random logits.
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="session")
def tiny_gpt_neox_dir(tmp_path_factory) -> Path:
    """A random GPT-NeoX checkpoint with a word-level tokenizer.json (tokens t0..t99)."""
    path = tmp_path_factory.mktemp("tiny-gpt-neox")
    torch.manual_seed(0)
    GPTNeoXForCausalLM(tiny_gpt_neox_config()).eval().save_pretrained(path)
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(TINY_VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def tiny_dynamo_dir(tiny_gpt_neox_dir, tmp_path_factory) -> Path:
    """tiny_gpt_neox_dir converted to DynaMo-T3 (random extra heads, seeded) and saved."""
    from dynamo_export import DynaMoForCausalLM

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-dynamo") / "dynamo-t3"
    DynaMoForCausalLM.from_gpt_neox(tiny_gpt_neox_dir, num_token_heads=TINY_HEADS).save_pretrained(path)
    return path


def _write_cooccurrence(path: Path, vocab_size: int) -> Path:
    """A small valid co-occurrence directory: a few pairs and one triple over `vocab_size` tokens."""
    from runtime.cooccurrence_file import save_cooccurrence

    pairs = np.array([1 * vocab_size + 2, 2 * vocab_size + 3, 5 * vocab_size + 7], dtype=np.int64)
    triples = np.array([(1 * vocab_size + 2) * vocab_size + 3], dtype=np.int64)
    save_cooccurrence(
        path,
        vocab_size=vocab_size,
        num_tokens=1000,
        ngram_positions={2: 999, 3: 998},
        min_count=1,
        eot_id=0,
        weights={
            2: (pairs, np.array([2.0, 3.0, 4.0], np.float32)),
            3: (triples, np.array([5.0], np.float32)),
        },
    )
    return path


@pytest.fixture(scope="session")
def make_cooccurrence():
    """make_cooccurrence(path, vocab_size) writes a small valid co-occurrence directory and returns path."""
    return _write_cooccurrence


@pytest.fixture(scope="session")
def tiny_cooccurrence_dir(tmp_path_factory) -> Path:
    """Co-occurrence weights over the tiny vocabulary (shipped inside tiny_artifact)."""
    return _write_cooccurrence(tmp_path_factory.mktemp("cooc") / "cooccurrence", TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_dynamo_dir, tiny_cooccurrence_dir, tmp_path_factory):
    """The DynaMo-T3 checkpoint exported once (fp32, weights in model.onnx.data, verified, with co-occurrence).

    Returns converters.artifact.ExportResult; the artifact directory is `.out`.
    """
    from converters.artifact import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-t3"
    return export_artifact(
        tiny_dynamo_dir, out=out, cooccurrence=tiny_cooccurrence_dir, external_data="always", progress=False
    )


def _python_sources_text() -> str:
    """Real English + code that ships with Python itself: no download."""
    import argparse
    import json as json_module

    return Path(argparse.__file__).read_text() + Path(json_module.__file__).read_text()


@pytest.fixture(scope="session")
def bpe_models(tmp_path_factory) -> Path:
    """A tiny random GPT-NeoX base with a real byte-level BPE tokenizer, its DynaMo-T3 conversion
    (head_init="copy") and co-occurrence masks of the tokenizer's corpus, both exported (no verify).

    Layout: tokenizer.json, tokens.{bin,json}, base/, t3/, cooc/, base-onnx/, t3-onnx/.
    """
    from converters.artifact import export_artifact
    from dynamo_export import DynaMoForCausalLM
    from dynamo_export.cooccurrence import build_cooccurrence
    from dynamo_export.data import train_tokenizer
    from dynamo_export.tokens import write_token_file

    root = tmp_path_factory.mktemp("bpe-models")
    text = root / "corpus.txt"
    text.write_text(_python_sources_text())
    tokenizer = train_tokenizer([text], 320, root / "tokenizer.json", show_progress=False)
    ids = np.asarray(tokenizer.encode(text.read_text()).ids, dtype=np.int64)
    write_token_file(root / "tokens", ids, vocab_size=320, eot_id=0)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=320,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=64,
        rotary_pct=0.25,
        max_position_embeddings=128,
        eos_token_id=0,
        bos_token_id=0,
    )
    GPTNeoXForCausalLM(config).save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    DynaMoForCausalLM.from_gpt_neox(root / "base", num_token_heads=3, head_init="copy").save_pretrained(
        root / "t3"
    )
    build_cooccurrence(root / "tokens", root / "cooc", orders=(2, 3), workers=1, progress=False)
    export_artifact(root / "base", out=root / "base-onnx", verify=False, progress=False)
    export_artifact(
        root / "t3", out=root / "t3-onnx", cooccurrence=root / "cooc", verify=False, progress=False
    )
    return root


@pytest.fixture
def reuse_tiny_export(monkeypatch, tiny_artifact):
    """Make export_artifact reuse the session's graph of the tiny DynaMo-T3 model instead of re-exporting it.

    Only valid for exports of tiny_dynamo_dir; every later step (fusion, dtype
    conversion, verification, manifest, rename) still runs for real.
    """
    from converters import artifact

    def export_onnx(model, path, spec, opset):
        path.parent.mkdir(parents=True)
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copyfile(tiny_artifact.out / name, path.parent / name)
        return path

    monkeypatch.setattr(artifact, "export_onnx", export_onnx)


@pytest.fixture
def one_torch_thread():
    """Training and evaluation tests on one torch thread: deterministic sums, no oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_cycle_token_files(root: Path, vocab: int, stride: int, noise: float, seed: int, sizes=(4000, 600)):
    """Train/val token files with learnable structure (token i = i * stride mod vocab, a share `noise`
    of them random), so training losses can fall; returns the two .bin paths."""
    from dynamo_export.tokens import write_token_file

    rng = np.random.default_rng(seed)
    paths = []
    for name, size in zip(("train", "val"), sizes, strict=True):
        ids = (np.arange(size) * stride) % vocab
        noisy = rng.random(size) < noise
        ids[noisy] = rng.integers(0, vocab, noisy.sum())
        write_token_file(root / name, ids, vocab, eot_id=0)
        paths.append(str(root / f"{name}.bin"))
    return tuple(paths)
