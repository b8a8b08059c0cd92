"""Modified-CLM loss, the three learning rates, the schedule, resume, n = 1 export and dynamo-train errors."""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.cli.train import main as train_main
from dynamo_export.errors import CheckpointError, TokenFileError, TrainingError
from dynamo_export.losses import head_log_likelihoods, joint_log_likelihood, multi_token_loss
from dynamo_export.tokens import write_token_file
from dynamo_export.training import (
    TrainConfig,
    build_optimizer,
    lr_multiplier,
    param_groups,
    save_gpt_neox,
    train,
)

VOCAB = 64
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """Train/val token files with learnable structure (a noisy cycle), so losses can fall."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)

    def make(name, size):
        ids = (np.arange(size) * 7) % VOCAB
        noise = rng.random(size) < 0.1
        ids[noise] = rng.integers(0, VOCAB, noise.sum())
        write_token_file(root / name, ids, VOCAB, eot_id=0)
        return str(root / f"{name}.bin")

    return make("train", 4000), make("val", 600)


def tiny_config(token_files, out, **overrides) -> TrainConfig:
    train_file, val_file = token_files
    fields = dict(
        train=train_file,
        val=val_file,
        out=str(out),
        init_config=dict(TINY),
        num_token_heads=3,
        seq_len=16,
        batch_size=4,
        steps=12,
        lr_b=3e-3,
        lr_m=3e-3,
        lr_mb=3e-4,
        eval_every=6,
        eval_batches=2,
        save_every=100,
    )
    return TrainConfig(**{**fields, **overrides})


def tiny_dynamo(n: int = 3, seed: int = 0) -> DynaMoForCausalLM:
    torch.manual_seed(seed)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, **TINY))
    return DynaMoForCausalLM.from_gpt_neox(base, num_token_heads=n)


# -- loss -------------------------------------------------------------------------------------------


def _logits(rows):  # rows[head][position] = (logit of token 0, logit of token 1)
    return torch.tensor([rows], dtype=torch.float32)  # (1, n, T, 2)


def test_loss_on_a_hand_checkable_example():
    # tokens 0 1 1; vocab {0, 1}. Head 1 at t=0,1 predicts x[1]=1, x[2]=1; head 2 at t=0 predicts x[2]=1.
    # t=2 for head 1 and t=1,2 for head 2 have no label: their logits (100, -100) must not count.
    ln3, skip = math.log(3), (100.0, -100.0)
    logits = _logits(
        [
            [(0.0, ln3), (0.0, 0.0), skip],  # p(1) = 3/4, 1/2
            [(ln3, 0.0), skip, skip],  # p(1) = 1/4
        ]
    )
    loss = multi_token_loss(logits, torch.tensor([[0, 1, 1]]))
    head1 = (math.log(4 / 3) + math.log(2)) / 2  # 0.490415
    head2 = math.log(4)  # 1.386294
    assert loss.per_head.tolist() == pytest.approx([head1, head2], abs=1e-6)
    assert loss.total.item() == pytest.approx(head1 + head2, abs=1e-6)  # 1.876709


def test_loss_uses_every_position_when_tokens_run_past_the_input():
    # T = 2 inputs (0, 1) and labels up to t+2: head 1 sees x[1], x[2]; head 2 sees x[2], x[3].
    logits = _logits([[(0.0, 0.0), (0.0, math.log(3))], [(math.log(3), 0.0), (0.0, 0.0)]])
    loss = multi_token_loss(logits, torch.tensor([[0, 1, 1, 0]]))
    head1 = (math.log(2) + math.log(4 / 3)) / 2  # x[1]=1 at p 1/2, x[2]=1 at p 3/4
    head2 = (math.log(4) + math.log(2)) / 2  # x[2]=1 at p 1/4, x[3]=0 at p 1/2
    assert loss.per_head.tolist() == pytest.approx([head1, head2], abs=1e-6)


def test_loss_rejects_a_head_without_labels():
    with pytest.raises(ValueError, match="head 2 has no label"):
        multi_token_loss(torch.zeros(1, 2, 1, 4), torch.tensor([[1, 2]]))


def test_head_log_likelihoods_share_positions_and_joint_is_their_sum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=gen)
    tokens = torch.randint(0, 5, (2, 6), generator=gen)
    ll = head_log_likelihoods(logits, tokens)  # only t < 6 - 3 has all three labels
    assert ll.shape == (2, 3, 3)
    for b in range(2):
        for i in range(3):
            for t in range(3):
                expected = torch.log_softmax(logits[b, i, t], -1)[tokens[b, t + i + 1]]
                assert ll[b, i, t].item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(joint_log_likelihood(ll), ll.sum(1))


# -- learning rates ---------------------------------------------------------------------------------


def _stem_grads(model, ids, heads):
    model.zero_grad(set_to_none=True)
    loss = multi_token_loss(model(ids).logits, ids).per_head[heads].sum()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [0.25, 0.1])
def test_branch_gradient_reaches_the_stem_scaled(scale):
    scaled, plain = tiny_dynamo().train(), tiny_dynamo().train()
    scaled.branch_grad_scale, plain.branch_grad_scale = scale, 1.0
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    stem = [k for k, _ in plain.named_parameters() if k.startswith(("stem.", "embed_in."))]
    new_heads = [k for k, _ in plain.named_parameters() if k.startswith(("heads.1.", "heads.2."))]

    extra_scaled, extra_plain = (
        _stem_grads(scaled, ids, slice(1, None)),
        _stem_grads(plain, ids, slice(1, None)),
    )
    for k in stem:
        if scale == 0.25:  # a power of two commutes exactly with every float op of the backward pass
            assert torch.equal(extra_scaled[k], scale * extra_plain[k]), k
        else:
            atol = 1e-6 * extra_plain[k].abs().max().item()  # float rounding, relative to the gradient's size
            torch.testing.assert_close(extra_scaled[k], scale * extra_plain[k], rtol=1e-5, atol=atol)
        assert extra_plain[k].abs().max() > 0, k
    for k in new_heads:  # the heads' own gradient is not scaled
        assert torch.equal(extra_scaled[k], extra_plain[k]), k

    head1_scaled, head1_plain = _stem_grads(scaled, ids, slice(0, 1)), _stem_grads(plain, ids, slice(0, 1))
    for k in stem:  # head 1's path into the stem is untouched
        assert torch.equal(head1_scaled[k], head1_plain[k]), k

    total = _stem_grads(scaled, ids, slice(None))
    for k in stem:
        atol = 1e-6 * total[k].abs().max().item()
        torch.testing.assert_close(total[k], head1_plain[k] + scale * extra_plain[k], rtol=1e-5, atol=atol)


def test_param_groups_hold_exactly_the_right_parameters(token_files, tmp_path):
    model = tiny_dynamo(n=3)
    cfg = tiny_config(token_files, tmp_path, lr_b=1e-5, lr_m=1e-3, lr_mb=1e-6, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: (g, sorted(names[id(p)] for p in g["params"])) for g in param_groups(model, cfg)}
    assert set(groups) == {"base", "base_no_decay", "heads", "heads_no_decay"}
    base = groups["base"][1] + groups["base_no_decay"][1]
    heads = groups["heads"][1] + groups["heads_no_decay"][1]
    assert all(n.startswith(("embed_in.", "stem.", "heads.0.", "embed_out.")) for n in base)
    assert all(n.startswith(("heads.1.", "heads.2.")) for n in heads)
    assert sorted(base + heads) == sorted(names.values())  # every parameter exactly once
    assert {"embed_in.weight", "embed_out.weight", "heads.0.final_layer_norm.weight"} <= set(base)
    assert groups["base"][0]["lr"] == 1e-5 and groups["heads"][0]["lr"] == 1e-3
    assert groups["base"][0]["weight_decay"] == 0.1 and groups["heads_no_decay"][0]["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and "norm" not in n for n in groups["base"][1] + groups["heads"][1])
    optimizer, _ = build_optimizer(model, cfg)
    assert model.branch_grad_scale == pytest.approx(1e-6 / 1e-5)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8

    base_only = {g["name"] for g in param_groups(tiny_dynamo(n=1), cfg)}
    assert base_only == {"base", "base_no_decay"}


def test_lr_schedule_warms_up_then_decays_to_zero(token_files, tmp_path):
    assert [lr_multiplier(s, 200, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(101, 200, 2) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_multiplier(200, 200, 2) == 0.0
    assert lr_multiplier(0, 50, 0) == 1.0  # no warm-up

    cfg = tiny_config(token_files, tmp_path, steps=300, warmup_frac=0.01)
    model = tiny_dynamo()
    optimizer, scheduler = build_optimizer(model, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert cfg.warmup_steps == 3
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert max(lrs) == pytest.approx(3e-3) and lrs.index(max(lrs)) == 2
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert 0 < lrs[-1] < 1e-6 and optimizer.param_groups[0]["lr"] == 0.0


# -- training runs ----------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_ends_with_identical_weights(token_files, tmp_path):
    cfg = tiny_config(token_files, tmp_path / "full", grad_accum=2, eval_every=4)
    full = train(cfg, progress=False)
    split_cfg = replace(cfg, out=str(tmp_path / "split"))
    checkpoint = train(split_cfg, stop_at=6, progress=False)
    assert checkpoint.name == "step-6" and (checkpoint / "trainer_state.safetensors").is_file()
    resumed = train(split_cfg, resume=True, progress=False)

    full_w, resumed_w = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert full_w.keys() == resumed_w.keys()
    assert all(torch.equal(full_w[k], resumed_w[k]) for k in full_w)

    def losses(out):
        lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in lines]

    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    log = losses(tmp_path / "full")
    assert [s for s, _, _ in log] == list(range(13))
    first_val, last_val = log[0][2], log[-1][2]
    assert all(b < a for a, b in zip(first_val, last_val, strict=True))  # every head learned the cycle


def test_fresh_base_exports_a_transformers_gpt_neox(token_files, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer = {
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(VOCAB)}, "unk_token": "t0"}
    }
    (tok_dir / "tokenizer.json").write_text(json.dumps(tokenizer))  # fingerprinted, so it must be one
    cfg = tiny_config(token_files, tmp_path / "run", num_token_heads=None, steps=3, tokenizer=str(tok_dir))
    final = train(cfg, progress=False)
    dynamo = DynaMoForCausalLM.from_pretrained(final)
    assert dynamo.num_token_heads == 1
    assert json.loads((final / "train_config.json").read_text())["steps"] == 3
    exported = tmp_path / "run" / "final-gpt-neox"
    assert json.loads((exported / "config.json").read_text())["model_type"] == "gpt_neox"
    assert (exported / "tokenizer.json").is_file() and (final / "tokenizer.json").is_file()
    neox = GPTNeoXForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (dynamo(ids).logits[:, 0] - neox(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert DynaMoForCausalLM.from_gpt_neox(exported, num_token_heads=3).num_token_heads == 3


def test_cli_trains_from_a_gpt_neox_checkpoint(token_files, tmp_path, capsys):
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, **TINY)).save_pretrained(tmp_path / "base")
    train_file, val_file = token_files
    out = tmp_path / "out"
    train_main(
        [
            "--train",
            train_file,
            "--val",
            val_file,
            "--out",
            str(out),
            "--model",
            str(tmp_path / "base"),
            "--num-token-heads",
            "2",
            "--head-init",
            "copy",
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--save-every",
            "2",
            "--no-progress",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    assert DynaMoForCausalLM.from_pretrained(out / "final").num_token_heads == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert {"lr", "train_loss", "grad_norm", "tokens_per_s"} <= set(records[1])
    assert set(records[1]["lr"]) == {"lr_b", "lr_m"} and len(records[2]["val_loss"]) == 2


# -- errors -----------------------------------------------------------------------------------------


def test_cli_reports_missing_files_and_bad_checkpoints(token_files, tmp_path):
    train_file, val_file = token_files
    common = ["--val", val_file, "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=r"dynamo-train: error: .*nowhere\.json not found"):
        train_main(
            [
                "--train",
                str(tmp_path / "nowhere.bin"),
                "--layers",
                "2",
                "--hidden",
                "32",
                "--heads",
                "4",
                *common,
            ]
        )
    (tmp_path / "notckpt").mkdir()
    with pytest.raises(SystemExit, match=r"has no config\.json"):
        train_main(["--train", train_file, "--model", str(tmp_path / "notckpt"), *common])
    with pytest.raises(SystemExit):  # argparse: a fresh base needs all three sizes
        train_main(["--train", train_file, "--layers", "2", *common])


def test_clear_errors_for_misconfigured_runs(token_files, tmp_path):
    root = tmp_path
    big = root / "big"
    write_token_file(big, np.arange(100) % 200, 200, eot_id=0)
    with pytest.raises(TokenFileError, match="vocabulary of 200 ids but the model has only 64"):
        train(
            tiny_config(
                token_files, root / "a", train=str(big) + ".bin", init_config={**TINY, "vocab_size": 64}
            ),
            progress=False,
        )
    with pytest.raises(TrainingError, match="not GPT-NeoX config fields: \\['hiden_size'\\]"):
        train(tiny_config(token_files, root / "b", init_config={**TINY, "hiden_size": 8}), progress=False)
    with pytest.raises(TrainingError, match="--seq-len 128 exceeds the model's context of 64"):
        train(tiny_config(token_files, root / "c", seq_len=128), progress=False)
    with pytest.raises(TrainingError, match="--batch-size must be >= 1"):
        train(tiny_config(token_files, root / "d", batch_size=0), progress=False)
    with pytest.raises(TrainingError, match="no step-N checkpoint"):
        train(tiny_config(token_files, root / "e"), resume=True, progress=False)

    cfg = tiny_config(token_files, root / "f", steps=4)
    train(cfg, stop_at=2, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg, progress=False)
    with pytest.raises(TrainingError, match=r"lr_b: checkpoint 0\.003 vs now 0\.001"):
        train(replace(cfg, lr_b=1e-3), resume=True, progress=False)

    tiny_dynamo(n=2).save_pretrained(root / "t2")
    with pytest.raises(TrainingError, match="DynaMo model with 2 heads, not --num-token-heads 3"):
        train(tiny_config(token_files, root / "g", init_config=None, model=str(root / "t2")), progress=False)


def test_checkpoint_directories_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "step-1"

    def failing_replace(src, dst):
        raise OSError("disk full")

    model = tiny_dynamo(n=1)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_gpt_neox(model, target)
    assert list(tmp_path.iterdir()) == []


def test_gpt_neox_export_needs_a_single_head(tmp_path):
    with pytest.raises(CheckpointError, match="has 3 heads"):
        save_gpt_neox(tiny_dynamo(n=3), tmp_path / "x")
