"""Self-distillation (--distill): the KL term, where its gradient goes, logging, resume and option errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from dynamo_export.cli.train import main as train_main
from dynamo_export.distill import gradient_sources, new_head_parameters, source_gradients
from dynamo_export.errors import TrainingError
from dynamo_export.losses import head1_distillation_kl, multi_token_loss
from dynamo_export.train_state import STATE_JSON
from dynamo_export.training import TrainConfig, train
from tests.conftest import noisy_cycle_token_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 48
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    return noisy_cycle_token_files(
        tmp_path_factory.mktemp("tokens"), VOCAB, stride=5, noise=0.2, seed=1, sizes=(3000, 400)
    )


def tiny_config(token_files, out, **overrides) -> TrainConfig:
    train_file, val_file = token_files
    fields = dict(
        train=train_file, val=val_file, out=str(out), init_config=dict(TINY), num_token_heads=3, seq_len=12,
        batch_size=4, steps=10, lr_b=3e-3, lr_m=3e-3, lr_mb=3e-4, eval_every=5, eval_batches=2, save_every=100,
    )  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def tiny_dynamo(n: int = 3, seed: int = 0, head_init: str = "random") -> DynaMoForCausalLM:
    torch.manual_seed(seed)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, initializer_range=0.1, **TINY))
    return DynaMoForCausalLM.from_gpt_neox(base, num_token_heads=n, head_init=head_init).train()


# -- the KL term ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_matches_an_explicit_sum_over_the_vocabulary(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=gen) * 2  # (B, n, T, V)
    kl = head1_distillation_kl(logits[:, 0], logits[:, 1:], temperature)
    assert kl.shape == (2,)
    for j in (1, 2):  # head i = j+1 at t is taught by head 1 at t+j
        total, count = 0.0, 0
        for b in range(2):
            for t in range(5 - j):
                p = torch.softmax(logits[b, 0, t + j].double() / temperature, -1)
                q = torch.softmax(logits[b, j, t].double() / temperature, -1)
                total += sum(p[x].item() * math.log(p[x].item() / q[x].item()) for x in range(6))
                count += 1
        assert kl[j - 1].item() == pytest.approx(total / count, rel=1e-5)


def test_kl_is_zero_when_a_head_copies_head_1_one_step_later():
    logits = torch.randn(1, 2, 4, 5, generator=torch.Generator().manual_seed(1))
    logits[:, 1, :3] = logits[:, 0, 1:]  # head 2 at t says what head 1 says at t+1
    assert head1_distillation_kl(logits[:, 0], logits[:, 1:]).item() == pytest.approx(0.0, abs=1e-6)
    logits[:, 1, 0, 0] += 3.0
    assert head1_distillation_kl(logits[:, 0], logits[:, 1:]).item() > 1e-3


# -- gradient paths ---------------------------------------------------------------------------------


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _named(model, sources, grads):
    names = {id(p): n for n, p in model.named_parameters()}
    head1 = {names[id(p)]: g for p, g in zip(sources.head1, grads.head1, strict=True)}
    heads = {names[id(p)]: g for p, g in zip(sources.heads + sources.shared, grads.heads, strict=True)}
    return head1, heads


@pytest.mark.parametrize("lr_mb", [0.0, 3e-4])
def test_kl_gradient_reaches_only_heads_2_to_n(lr_mb):
    w, temperature = 0.5, 0.7
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    tokens = ids  # labels from the input itself: positions without a label are skipped

    # The function under test, with hooks on the stem's output and on every weight outside heads 2..n.
    model = tiny_dynamo()
    sources = gradient_sources(model, lr_mb)
    new_heads = {id(p) for p in new_head_parameters(model)}
    fired: dict[str, int] = {}

    def count(name):
        def hook(grad):
            fired[name] = fired.get(name, 0) + 1

        return hook

    for name, param in model.named_parameters():
        if id(param) not in new_heads:
            param.register_hook(count(name))

    def hook_stem_output(module, inputs, output):
        output[0].register_hook(count("stem output"))

    def hook_head_2_output(module, inputs, output):
        output.register_hook(count("head 2"))

    model.stem[-1].register_forward_hook(hook_stem_output)
    model.heads[1].register_forward_hook(hook_head_2_output)
    grads = source_gradients(*model.source_logits(ids), tokens, sources, w, temperature)
    head1, heads = _named(model, sources, grads)
    # Head 1's source runs the stem's backward once and never enters heads 2..n; the heads' source
    # runs it once more for the CE's share when LR_MB > 0, never for the KL, not at all with LR_MB = 0.
    shared = {n for n, p in model.named_parameters() if n.startswith(("embed_in.", "stem.", "embed_out."))}
    assert fired["stem output"] == (1 if lr_mb == 0 else 2)
    assert fired.pop("head 2") == (1 if lr_mb == 0 else 2)  # the heads' mixed loss, then their CE's share
    assert fired == {"stem output": fired["stem output"]} | {
        n: 2 if lr_mb > 0 and n in shared else 1 for n in head1
    }
    assert set(heads) == {n for n, p in model.named_parameters() if id(p) in new_heads} | (
        shared if lr_mb else set()
    )

    # Reference 1: the cross-entropy alone, head 1 at weight 1 and heads 2..n at 1 - W, one source each.
    ce_model = tiny_dynamo()
    ce = multi_token_loss(ce_model(ids).logits, tokens).per_head
    ce[0].backward(retain_graph=True)
    ce_head1 = _grads(ce_model)
    ce_model.zero_grad(set_to_none=True)
    ((1 - w) * ce[1:].sum()).backward()
    ce_heads = _grads(ce_model)
    # Reference 2: the KL's full gradient (plain backward through everything), read at heads 2..n.
    kl_model = tiny_dynamo()
    kl_logits = kl_model(ids).logits
    (w * head1_distillation_kl(kl_logits[:, 0], kl_logits[:, 1:], temperature).sum()).backward()
    kl_grads = _grads(kl_model)

    assert head1.keys() == {n for n, p in model.named_parameters() if id(p) not in new_heads}
    assert {"embed_in.weight", "embed_out.weight", "heads.0.layer.mlp.dense_h_to_4h.weight"} <= set(head1)
    for name in head1:  # stem, head 1, embed_in/embed_out: exactly head 1's CE gradient
        assert torch.equal(head1[name], ce_head1[name]), name
    for name in heads:
        if name in shared:  # only the CE's share, at LR_MB
            torch.testing.assert_close(heads[name], ce_heads[name], rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(heads[name], ce_heads[name] + kl_grads[name], rtol=1e-5, atol=1e-7)
            assert kl_grads[name].abs().max() > 0, name
    # ... while the same KL through plain backward would have moved the stem and embed_out.
    assert kl_grads["stem.0.attention.query_key_value.weight"].abs().max() > 0
    assert kl_grads["embed_out.weight"].abs().max() > 0
    assert grads.kl.shape == (2,) and grads.ce.shape == (3,)


def test_without_distillation_the_sources_add_up_to_the_plain_objective():
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    a, b = tiny_dynamo(), tiny_dynamo()
    sources = gradient_sources(a, 1e-4)
    grads = source_gradients(*a.source_logits(ids), ids, sources, 0.0, 0.7, accum=2)
    (multi_token_loss(b(ids).logits, ids).total / 2).backward()
    assert grads.kl.numel() == 0
    head1, heads = _named(a, sources, grads)
    plain = _grads(b)
    for name in plain:
        parts = [g[name] for g in (head1, heads) if name in g]
        torch.testing.assert_close(sum(parts), plain[name], rtol=1e-5, atol=1e-7)
        if len(parts) == 1:  # head 1's own weights and heads 2..n's: one source only
            assert torch.equal(parts[0], plain[name]), name


def test_full_distillation_leaves_the_stem_to_head_1():
    # W = 1: heads 2..n learn from head 1 only, so nothing from them reaches the stem.
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    a, b = tiny_dynamo(), tiny_dynamo()
    sources = gradient_sources(a, 1e-4)
    head1, heads = _named(a, sources, source_gradients(*a.source_logits(ids), ids, sources, 1.0, 1.0))
    multi_token_loss(b(ids).logits, ids).per_head[0].backward()
    plain = _grads(b)
    assert "stem.0.attention.dense.weight" in head1 and "embed_out.weight" in head1
    for name in head1:
        assert torch.equal(head1[name], plain[name]), name
    for name in ("stem.0.attention.dense.weight", "embed_out.weight", "embed_in.weight"):
        assert heads[name].abs().max() == 0, name


# -- training runs ----------------------------------------------------------------------------------


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _val_kl(model_dir, val_file, temperature):
    ids = np.fromfile(val_file, dtype=np.uint16)[:200].astype(np.int64)
    model = DynaMoForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).view(10, 20)).logits
        return head1_distillation_kl(logits[:, 0], logits[:, 1:], temperature)


def test_distilled_run_logs_ce_and_kl_resumes_exactly_and_lowers_the_kl(token_files, tmp_path):
    # Head 1 all but frozen (LR_B tiny, LR_MB 0), so the heads chase a fixed, non-uniform teacher.
    frozen = dict(lr_b=1e-9, lr_mb=0.0, lr_m=1e-2, init_config={**TINY, "initializer_range": 0.2})
    cfg = tiny_config(token_files, tmp_path / "full", distill=1.0, distill_temperature=0.7, **frozen)
    full = train(cfg, progress=False)
    split = replace(cfg, out=str(tmp_path / "split"))
    train(split, stop_at=4, progress=False)
    resumed = train(split, resume=True, progress=False)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    records = _log(tmp_path / "full")
    assert [r["step"] for r in records] == list(range(11))
    assert all(len(r["train_loss"]) == 3 and len(r["train_kl"]) == 2 for r in records[1:])
    assert json.loads((full / "train_config.json").read_text())["distill"] == 1.0

    plain = train(replace(cfg, out=str(tmp_path / "plain"), distill=0.0), progress=False)
    start = train(replace(cfg, out=str(tmp_path / "start"), steps=1, lr_m=1e-12), progress=False)
    kl_distilled, kl_plain, kl_start = (_val_kl(m, cfg.val, 0.7) for m in (full, plain, start))
    assert records[1]["train_kl"][0] > 0.1  # a teacher far from the random heads
    assert torch.all(kl_distilled < 0.8 * kl_start) and torch.all(kl_distilled < kl_plain)


def test_plain_run_logs_no_kl(token_files, tmp_path):
    train(tiny_config(token_files, tmp_path, steps=2), progress=False)
    assert all("train_kl" not in r for r in _log(tmp_path))


def test_checkpoints_from_before_distillation_still_resume(token_files, tmp_path):
    cfg = tiny_config(token_files, tmp_path, steps=4)
    checkpoint = train(cfg, stop_at=2, progress=False)
    meta = json.loads((checkpoint / STATE_JSON).read_text())
    del meta["config"]["distill"], meta["config"]["distill_temperature"]
    (checkpoint / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"distill: checkpoint 0\.0 vs now 0\.5"):
        train(replace(cfg, distill=0.5), resume=True, progress=False)
    assert train(cfg, resume=True, progress=False).name == "final"


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_distill_weight_outside_0_1_is_refused(token_files, tmp_path, bad):
    with pytest.raises(TrainingError, match=r"--distill is a mixing weight and must lie in \[0, 1\]"):
        train(tiny_config(token_files, tmp_path, distill=bad), progress=False)


def test_bad_temperature_and_single_head_are_refused(token_files, tmp_path):
    with pytest.raises(TrainingError, match=r"--distill-temperature must be > 0 and finite, got 0\.0"):
        train(tiny_config(token_files, tmp_path / "a", distill=0.5, distill_temperature=0.0), progress=False)
    with pytest.raises(TrainingError, match="this model has one head: drop --distill"):
        train(tiny_config(token_files, tmp_path / "b", distill=0.5, num_token_heads=1), progress=False)


def test_cli_passes_the_options_and_reports_errors(token_files, tmp_path, capsys):
    train_file, val_file = token_files
    common = [
        "--train", train_file, "--val", val_file, "--layers", "3", "--hidden", "32", "--heads", "4",
        "--num-token-heads", "2", "--seq-len", "8", "--batch-size", "2", "--eval-batches", "1", "--no-progress",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=r"dynamo-train: error: .*--distill is a mixing weight.*got 2\.0"):
        train_main([*common, "--out", str(tmp_path / "bad"), "--steps", "1", "--distill", "2"])
    out = tmp_path / "ok"
    train_main(
        [*common, "--out", str(out), "--steps", "2", "--distill", "0.5", "--distill-temperature", "0.7"]
    )
    saved = json.loads((out / "final" / "train_config.json").read_text())
    assert (saved["distill"], saved["distill_temperature"]) == (0.5, 0.7)
    assert len(_log(out)[1]["train_kl"]) == 1
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "the runtime samples at 0.7" in " ".join(capsys.readouterr().out.lower().split())
