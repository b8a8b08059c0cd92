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
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.checkpoint import save_gpt_neox
from dynamo_export.cli.train import main as train_main
from dynamo_export.distill import source_gradients
from dynamo_export.errors import CheckpointError, TokenFileError, TrainingError
from dynamo_export.losses import head_log_likelihoods, joint_log_likelihood, multi_token_loss
from dynamo_export.three_rates import ThreeRateAdamW, lr_multiplier
from dynamo_export.tokens import open_tokens, write_token_file
from dynamo_export.train_state import STATE_JSON
from dynamo_export.training import TrainConfig, train
from tests.conftest import noisy_cycle_token_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    return noisy_cycle_token_files(tmp_path_factory.mktemp("tokens"), VOCAB, stride=7, noise=0.1, seed=0)


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


def test_param_groups_hold_exactly_the_right_parameters(token_files, tmp_path):
    model = tiny_dynamo(n=3)
    cfg = tiny_config(token_files, tmp_path, lr_b=1e-5, lr_m=1e-3, lr_mb=1e-6, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = ThreeRateAdamW(model, cfg)
    assert list(optimizer.optimizers) == ["head1", "heads"]  # head 1's step (and the decay) first
    groups = {
        (source, g["name"]): (g, sorted(names[id(p)] for p in g["params"]))
        for source, opt in optimizer.optimizers.items()
        for g in opt.param_groups
    }
    assert set(groups) == {
        ("head1", "base"),
        ("head1", "base_no_decay"),
        ("heads", "heads"),
        ("heads", "heads_no_decay"),
        ("heads", "shared"),
    }
    base = groups["head1", "base"][1] + groups["head1", "base_no_decay"][1]
    heads = groups["heads", "heads"][1] + groups["heads", "heads_no_decay"][1]
    shared = groups["heads", "shared"][1]
    assert sorted(base + heads) == sorted(names.values())  # every parameter exactly once per source
    assert all(n.startswith(("embed_in.", "stem.", "heads.0.", "embed_out.")) for n in base)
    assert all(n.startswith(("heads.1.", "heads.2.")) for n in heads)
    assert shared == sorted(n for n in base if not n.startswith("heads.0."))  # what heads 2..n read
    assert {"embed_in.weight", "embed_out.weight", "stem.0.attention.dense.weight"} <= set(shared)
    rates = {key: (g["lr"], g["weight_decay"]) for key, (g, _) in groups.items()}
    assert rates["head1", "base"] == (1e-5, 0.1) and rates["head1", "base_no_decay"] == (1e-5, 0.0)
    assert rates["heads", "heads"] == (1e-3, 0.1) and rates["heads", "heads_no_decay"] == (1e-3, 0.0)
    assert rates["heads", "shared"] == (1e-6, 0.0)  # base weights decay once, in head 1's step
    assert all(n.endswith(".weight") and "norm" not in n for n in groups["head1", "base"][1])
    adam = optimizer.optimizers["heads"].defaults
    assert adam["betas"] == (0.9, 0.95) and adam["eps"] == 1e-8

    no_mb = ThreeRateAdamW(tiny_dynamo(n=3), replace(cfg, lr_mb=0.0))
    assert [g["name"] for g in no_mb.optimizers["heads"].param_groups] == ["heads", "heads_no_decay"]
    assert list(ThreeRateAdamW(tiny_dynamo(n=1), cfg).optimizers) == ["head1"]


def _base_names(model):
    return [n for n, _ in model.named_parameters() if not n.startswith(("heads.1.", "heads.2."))]


def _reference_run(cfg, model, params, groups, loss_of_logits):
    """A hand-written AdamW loop over `params` on the trainer's batches, with its schedule and clipping."""
    ids, _ = open_tokens(cfg.train)
    window = cfg.seq_len + cfg.num_token_heads  # the trainer's windows, whatever `model` is
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    peak = [g["lr"] for g in optimizer.param_groups]
    for step in range(cfg.steps):
        warmup = cfg.warmup_steps
        if step < warmup:
            multiplier = (step + 1) / warmup
        else:
            multiplier = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (cfg.steps - warmup))))
        for group, lr in zip(optimizer.param_groups, peak, strict=True):
            group["lr"] = lr * multiplier
        for micro in range(cfg.grad_accum):  # the trainer's micro-batch k: offsets drawn from (seed, k)
            rng = np.random.default_rng([cfg.seed, step * cfg.grad_accum + micro])
            starts = rng.integers(0, len(ids) - window + 1, size=cfg.batch_size)
            batch = torch.from_numpy(
                np.stack([np.asarray(ids[s : s + window], dtype=np.int64) for s in starts])
            )
            logits = model(batch[:, : cfg.seq_len]).logits  # (B, n, T, V)
            (loss_of_logits(logits, batch) / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return model


def _ce(logits, batch, head):  # head i's mean cross-entropy (i from 1), every position labelled
    seq = logits.shape[2]
    nll = F.cross_entropy(
        logits[:, head - 1].reshape(-1, VOCAB).float(),
        batch[:, head : head + seq].reshape(-1),
        reduction="none",
    )
    return nll.view(batch.shape[0], seq).mean()


def _decay_groups(params, lr, weight_decay):
    return [
        {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]


def test_with_lr_mb_zero_the_base_follows_head_1_alone(token_files, tmp_path):
    """LR_MB = 0: embed_in, stem, head 1 and embed_out move exactly as head 1's loss alone moves them.

    The reference trains the base alone: a one-head model with the same starting weights, plain AdamW on
    head 1's cross-entropy, over the same batches with the same schedule, decay groups and clipping.
    """
    cfg = tiny_config(
        token_files, tmp_path, lr_mb=0.0, steps=6, grad_accum=2, warmup_frac=0.2, weight_decay=0.1, clip=0.5
    )
    final = load_file(train(cfg, progress=False) / "model.safetensors")

    start = tiny_dynamo(n=3, seed=cfg.seed).state_dict()  # the trainer's fresh model (same seed, same draws)
    base = tiny_dynamo(n=1, seed=cfg.seed).train()  # the same base weights, no heads 2..n
    assert all(torch.equal(start[name], value) for name, value in base.state_dict().items())
    params = list(base.parameters())
    groups = _decay_groups(params, cfg.lr_b, cfg.weight_decay)
    _reference_run(cfg, base, params, groups, lambda logits, batch: _ce(logits, batch, 1))

    reference = base.state_dict()
    assert set(reference) == set(_base_names(tiny_dynamo(n=3)))
    for name in reference:
        assert torch.equal(final[name], reference[name]), (name, (final[name] - reference[name]).abs().max())
        assert not torch.equal(final[name], start[name]), name
    name = "heads.1.layer.mlp.dense_4h_to_h.weight"
    assert not torch.equal(final[name], start[name])  # heads 2..n did train (at LR_M)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert any(r["grad_norm"]["head1"] > cfg.clip for r in log[1:])  # clipping took part
    assert log[3]["lr"] == pytest.approx(
        {k: v * lr_multiplier(2, 6, 1) for k, v in {"lr_b": cfg.lr_b, "lr_m": cfg.lr_m, "lr_mb": 0.0}.items()}
    )


def test_heads_move_the_shared_weights_at_lr_mb_with_their_own_adam_state(token_files, tmp_path):
    """LR_B ~ 0: the shared base weights move as AdamW on heads 2..n's loss at LR_MB (and heads 2..n at LR_M)."""
    cfg = tiny_config(
        token_files, tmp_path, lr_b=1e-12, lr_m=3e-3, lr_mb=1e-3, steps=6, grad_accum=2, warmup_frac=0.2,
        weight_decay=0.1, clip=0.5,
    )  # fmt: skip
    final = load_file(train(cfg, progress=False) / "model.safetensors")

    model = tiny_dynamo(n=3, seed=cfg.seed).train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    named = dict(model.named_parameters())
    own = [p for n, p in named.items() if n.startswith(("heads.1.", "heads.2."))]
    shared = [p for n, p in named.items() if n.startswith(("embed_in.", "stem.", "embed_out."))]
    groups = [
        *_decay_groups(own, cfg.lr_m, cfg.weight_decay),
        {"params": shared, "lr": cfg.lr_mb, "weight_decay": 0.0},
    ]

    def heads_loss(logits, batch):
        return _ce(logits, batch, 2) + _ce(logits, batch, 3)

    _reference_run(cfg, model, own + shared, groups, heads_loss)

    reference = model.state_dict()
    for name in named:
        if name.startswith("heads.0."):  # LR_B ~ 0: head 1's own weights stay put
            torch.testing.assert_close(final[name], start[name], rtol=0, atol=1e-9)
        else:
            torch.testing.assert_close(
                final[name], reference[name], rtol=0, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
            )
    for name in ("embed_out.weight", "stem.0.attention.query_key_value.weight", "embed_in.weight"):
        assert (final[name] - start[name]).abs().max() > 1e-3, name  # moved by the heads, at LR_MB


def test_lr_schedule_warms_up_then_decays_to_zero(token_files, tmp_path):
    assert [lr_multiplier(s, 200, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(101, 200, 2) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_multiplier(200, 200, 2) == 0.0
    assert lr_multiplier(0, 50, 0) == 1.0  # no warm-up

    cfg = tiny_config(token_files, tmp_path, steps=300, warmup_frac=0.01, lr_b=3e-3, lr_m=1e-2, lr_mb=1e-4)
    optimizer = ThreeRateAdamW(tiny_dynamo(), cfg)
    rates = [optimizer.rates(step) for step in range(cfg.steps)]
    lrs = [r["lr_b"] for r in rates]
    assert cfg.warmup_steps == 3
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert max(lrs) == pytest.approx(3e-3) and lrs.index(max(lrs)) == 2
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert 0 < lrs[-1] < 1e-6 and optimizer.rates(cfg.steps)["lr_b"] == 0.0
    # One schedule multiplies all three rates.
    assert all(r["lr_m"] == pytest.approx(10 / 3 * r["lr_b"]) for r in rates)
    assert all(r["lr_mb"] == pytest.approx(r["lr_b"] / 30) for r in rates)
    # ... and it is what the AdamW groups step with.
    model = tiny_dynamo()
    optimizer = ThreeRateAdamW(model, cfg)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    optimizer.accumulate(source_gradients(*model.source_logits(ids), ids, optimizer.sources, 0.0, 1.0))
    optimizer.step(1)
    used = {g["lr_name"]: g["lr"] for opt in optimizer.optimizers.values() for g in opt.param_groups}
    assert (
        used
        == optimizer.rates(1)
        == {"lr_b": 2e-3, "lr_m": pytest.approx(2e-3 * 10 / 3), "lr_mb": 1e-4 * 2 / 3}
    )


# -- training runs ----------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_ends_with_identical_weights(token_files, tmp_path):
    cfg = tiny_config(token_files, tmp_path / "full", grad_accum=2, eval_every=4)
    full = train(cfg, progress=False)
    split_cfg = replace(cfg, out=str(tmp_path / "split"))
    checkpoint = train(split_cfg, stop_at=6, progress=False)
    assert checkpoint.name == "step-6" and (checkpoint / "trainer_state.safetensors").is_file()
    state = load_file(checkpoint / "trainer_state.safetensors")
    sources = {k.split(".")[1] for k in state if k.startswith("optimizer.")}
    assert sources == {"head1", "heads"}  # the shared weights' second Adam state travels too
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
    assert set(records[1]["lr"]) == {"lr_b", "lr_m", "lr_mb"} and len(records[2]["val_loss"]) == 2
    assert set(records[1]["grad_norm"]) == {"head1", "heads"}


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
    state = root / "f" / "checkpoints" / "step-2" / STATE_JSON
    state.write_text(json.dumps({**json.loads(state.read_text()), "format": 1}))
    with pytest.raises(TrainingError, match=r"LR_MB as a gradient scale \(format 1.*start a new --out"):
        train(cfg, resume=True, progress=False)

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
