"""PPL_1..PPL_n and PPL_1:n against brute force (prefix by prefix, and transformers for n = 1)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.cli.eval import main as eval_main
from dynamo_export.errors import CheckpointError, TokenFileError
from dynamo_export.evaluation import evaluate, load_eval_model, num_windows
from dynamo_export.tokens import open_tokens, write_token_file
from runtime.atomic import atomic_write_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 50
SEQ = 8


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "heldout"
    write_token_file(path, np.random.default_rng(0).integers(0, VOCAB, 61), VOCAB, eot_id=0)
    return path


def brute_force_nll(model: DynaMoForCausalLM, ids: np.ndarray, windows: int) -> list[float]:
    """Each position t of window k scored from its own prefix window[:t+1], one forward pass per prefix."""
    n = model.num_token_heads
    total, count = np.zeros(n), 0
    with torch.no_grad():
        for k in range(windows):
            window = torch.tensor(np.asarray(ids[k * SEQ : k * SEQ + SEQ + n], dtype=np.int64))
            for t in range(SEQ):
                logits = model(window[None, : t + 1]).logits[0, :, -1]  # (n, V) at the prefix's last position
                log_probs = torch.log_softmax(logits.double(), dim=-1)
                total -= np.array([log_probs[i, window[t + i + 1]].item() for i in range(n)])
                count += 1
    return (total / count).tolist()


def test_head_perplexities_match_prefix_by_prefix_brute_force(tokens):
    model = DynaMoForCausalLM.from_gpt_neox(tiny_neox(), num_token_heads=3).eval()
    ids, _ = open_tokens(tokens)
    windows = num_windows(len(ids), SEQ, 3)
    assert windows == (61 - 3) // SEQ == 7
    result = evaluate(model, ids, SEQ, batch_size=3, progress=False)  # batches of 3, 3, 1 windows
    expected = brute_force_nll(model, ids, windows)
    assert result.num_positions == windows * SEQ
    assert result.nll_per_head == pytest.approx(expected, abs=1e-5)
    metrics = result.metrics()
    assert list(metrics) == ["PPL_1", "PPL_2", "PPL_3", "PPL_1:2", "PPL_1:3"]
    assert metrics["PPL_1:2"] == pytest.approx(math.exp(sum(expected[:2]) / 2), rel=1e-5)
    assert metrics["PPL_2"] == pytest.approx(math.exp(expected[1]), rel=1e-5)
    # J = product of marginals, so PPL_1:n is the geometric mean of the heads' perplexities.
    assert metrics["PPL_1:3"] == pytest.approx(math.exp(sum(expected) / 3), rel=1e-5)


def test_plain_gpt_neox_checkpoint_is_scored_as_one_head_like_transformers(tokens, tmp_path):
    base = tiny_neox(seed=1)
    base.save_pretrained(tmp_path / "base")
    ids, _ = open_tokens(tokens)
    windows = num_windows(len(ids), SEQ, 1)
    nll = 0.0
    with torch.no_grad():
        for k in range(windows):
            window = torch.tensor(np.asarray(ids[k * SEQ : k * SEQ + SEQ + 1], dtype=np.int64))
            log_probs = torch.log_softmax(base(window[None, :SEQ]).logits[0].double(), dim=-1)  # (SEQ, V)
            nll -= log_probs[torch.arange(SEQ), window[1:]].sum().item()
    expected = nll / (windows * SEQ)
    result = evaluate(load_eval_model(tmp_path / "base"), ids, SEQ, batch_size=4, progress=False)
    assert result.num_token_heads == 1 and result.num_windows == windows == 7
    assert result.nll_per_head[0] == pytest.approx(expected, abs=1e-5)
    assert result.metrics()["PPL_1:1"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_max_batches_limits_the_windows(tokens):
    model = DynaMoForCausalLM.from_gpt_neox(tiny_neox(), num_token_heads=2).train()
    ids, _ = open_tokens(tokens)
    result = evaluate(model, ids, SEQ, batch_size=2, max_batches=2, progress=False)
    assert result.num_windows == 4 and result.num_positions == 4 * SEQ
    assert model.training  # validation inside training hands the model back in training mode


def test_cli_prints_a_table_and_writes_json(tokens, tmp_path, capsys):
    model = DynaMoForCausalLM.from_gpt_neox(tiny_neox(), num_token_heads=3)
    model.save_pretrained(tmp_path / "t3")
    out = tmp_path / "eval.json"
    eval_main(
        [
            "--model",
            str(tmp_path / "t3"),
            "--tokens",
            str(tokens),
            "--seq-len",
            str(SEQ),
            "--batch-size",
            "4",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["ppl"]) == {"PPL_1", "PPL_2", "PPL_3", "PPL_1:2", "PPL_1:3"}
    assert report["num_positions"] == 7 * SEQ and report["model"] == str(tmp_path / "t3")
    assert f"{report['ppl']['PPL_1:3']:.4f}" in printed and "PPL_3" in printed


def test_clear_errors(tokens, tmp_path):
    model = DynaMoForCausalLM.from_gpt_neox(tiny_neox(), num_token_heads=3)
    model.save_pretrained(tmp_path / "t3")
    short = tmp_path / "short"
    write_token_file(short, np.arange(10) % VOCAB, VOCAB, eot_id=0)
    with pytest.raises(TokenFileError, match="fewer than one window of seq_len \\+ n = 11"):
        evaluate(model, open_tokens(short)[0], SEQ, batch_size=2, progress=False)

    big = tmp_path / "big"
    write_token_file(big, np.arange(100), 100, eot_id=0)
    with pytest.raises(SystemExit, match="vocabulary of 100 ids but the model has only 50"):
        eval_main(["--model", str(tmp_path / "t3"), "--tokens", str(big), "--no-progress"])
    with pytest.raises(SystemExit, match=r"missing\.json not found"):
        eval_main(["--model", str(tmp_path / "t3"), "--tokens", str(tmp_path / "missing"), "--no-progress"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_eval_model(tmp_path / "nope")
    with pytest.raises(SystemExit, match="exceeds the model's context of 32"):
        eval_main(
            ["--model", str(tmp_path / "t3"), "--tokens", str(tokens), "--seq-len", "64", "--no-progress"]
        )


def test_json_is_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    atomic_write_json(target, {"old": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
