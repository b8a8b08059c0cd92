"""The DynaMo model against transformers' GPTNeoXForCausalLM (the independent reference)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dynamo_export import DynaMoConfig, DynaMoForCausalLM
from dynamo_export.errors import CheckpointError

VOCAB = 97


def tiny_neox(
    parallel: bool = True, rotary_pct: float = 0.25, layers: int = 3, seed: int = 0
) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=layers,
        intermediate_size=64,
        rotary_pct=rotary_pct,
        use_parallel_residual=parallel,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_neox().save_pretrained(path)
    return path


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_head1_matches_transformers_after_save_and_reload(tmp_path, parallel, rotary_pct):
    base = tiny_neox(parallel=parallel, rotary_pct=rotary_pct)
    base.save_pretrained(tmp_path / "base")
    DynaMoForCausalLM.from_gpt_neox(tmp_path / "base", num_token_heads=3).save_pretrained(tmp_path / "dynamo")
    model = DynaMoForCausalLM.from_pretrained(tmp_path / "dynamo")
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(ids).logits
        logits = model(ids).logits
    assert logits.shape == (2, 3, 17, VOCAB)
    assert (logits[:, 0] - expected).abs().max().item() <= 1e-5


def test_head1_matches_transformers_with_left_padding(saved_base):
    base = GPTNeoXForCausalLM.from_pretrained(saved_base).eval()
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=2).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=position_ids).logits
        logits = model(ids, attention_mask=mask).logits[:, 0]
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("step", [1, 3])
def test_kv_cache_decoding_equals_full_forward_for_every_head(saved_base, step):
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3, head_init="random").eval()
    ids = torch.randint(0, VOCAB, (2, 22), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start in range(10, 22, step):
            out = model(ids[:, start : start + step], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    incremental = torch.cat(pieces, dim=2)
    assert (incremental - full).abs().max().item() <= 1e-5
    config = model.config
    assert len(cache) == config.num_hidden_layers + 3 - 1
    assert cache[0][0].shape == (
        2,
        config.num_attention_heads,
        22,
        config.hidden_size // config.num_attention_heads,
    )


def test_cache_layer_order_is_stem_then_head1_then_extra_heads(saved_base):
    """Layer i of the cache is the one whose attention has layer_idx i (the ONNX past_key_values.{i})."""
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3)
    layers = [*model.stem, *(head.layer for head in model.heads)]
    assert [layer.attention.layer_idx for layer in layers] == list(range(model.config.num_cache_layers))
    base = GPTNeoXForCausalLM.from_pretrained(saved_base)
    torch.testing.assert_close(
        model.heads[0].layer.attention.dense.weight, base.gpt_neox.layers[-1].attention.dense.weight
    )
    torch.testing.assert_close(
        model.stem[0].attention.dense.weight, base.gpt_neox.layers[0].attention.dense.weight
    )


def test_head_init_copy_duplicates_last_layer_and_random_does_not(saved_base):
    copied = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3, head_init="copy")
    random = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3, head_init="random")
    w0 = copied.heads[0].layer.mlp.dense_h_to_4h.weight
    for j in (1, 2):
        torch.testing.assert_close(copied.heads[j].layer.mlp.dense_h_to_4h.weight, w0)
        assert copied.heads[j].layer.mlp.dense_h_to_4h.weight.data_ptr() != w0.data_ptr()
        assert not torch.equal(random.heads[j].layer.mlp.dense_h_to_4h.weight, w0)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        logits = copied(ids).logits
    # Copied heads see the stem output, exactly what head 1 sees, so they start identical.
    torch.testing.assert_close(logits[:, 1], logits[:, 0])
    assert copied.config.head_init == "copy"


def test_extra_parameters_are_n_minus_1_decoder_layers(saved_base):
    base = GPTNeoXForCausalLM.from_pretrained(saved_base)
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3)
    layer = sum(p.numel() for p in base.gpt_neox.layers[-1].parameters())
    final_ln = sum(p.numel() for p in base.gpt_neox.final_layer_norm.parameters())
    base_params = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in model.parameters()) == base_params + 2 * (layer + final_ln)


def test_source_logits_are_the_forward_logits_split_after_head_1(saved_base):
    """Training's per-source logits: the same values, and head 1's have no path into heads 2..n."""
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=3).train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    first, rest = model.source_logits(ids)
    with torch.no_grad():
        full = model(ids).logits  # (B, n, T, V)
    assert first.shape == (2, 12, VOCAB) and rest.shape == (2, 2, 12, VOCAB)
    torch.testing.assert_close(first, full[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rest, full[:, 1:], rtol=0, atol=1e-6)
    extra = [p for head in model.heads[1:] for p in head.parameters()]
    assert all(g is None for g in torch.autograd.grad(first.sum(), extra, allow_unused=True))

    single = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=1)
    assert single.source_logits(ids)[1] is None


def test_config_carries_head_fields_and_validates():
    config = DynaMoConfig(num_token_heads=2, head_init="copy", num_hidden_layers=4)
    assert config.num_cache_layers == 5
    with pytest.raises(ValueError, match="num_token_heads"):
        DynaMoConfig(num_token_heads=0)
    with pytest.raises(ValueError, match="head_init"):
        DynaMoConfig(head_init="zeros")


def test_save_writes_safetensors_and_refuses_to_overwrite(saved_base, tmp_path):
    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=2)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["num_token_heads"] == 2
    with pytest.raises(CheckpointError, match="already exists"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_files_travel_with_the_checkpoint(saved_base, tmp_path):
    source = tmp_path / "with_tok"
    tiny_neox().save_pretrained(source)
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0")).to_str()
    (source / "tokenizer.json").write_text(tokenizer)
    DynaMoForCausalLM.from_gpt_neox(source).save_pretrained(tmp_path / "a")
    DynaMoForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").read_text() == tokenizer


def test_clear_errors_for_bad_paths_and_mismatched_checkpoints(saved_base, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DynaMoForCausalLM.from_gpt_neox(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        DynaMoForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        DynaMoForCausalLM.from_gpt_neox(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="from_gpt_neox"):
        DynaMoForCausalLM.from_pretrained(saved_base)

    model = DynaMoForCausalLM.from_gpt_neox(saved_base, num_token_heads=2)
    model.save_pretrained(tmp_path / "dyn")
    with pytest.raises(CheckpointError, match="from_pretrained"):
        DynaMoForCausalLM.from_gpt_neox(tmp_path / "dyn")
    config = json.loads((tmp_path / "dyn" / "config.json").read_text())
    config["num_token_heads"] = 3
    (tmp_path / "dyn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors: \['heads\.2\."):
        DynaMoForCausalLM.from_pretrained(tmp_path / "dyn")
    config["num_token_heads"], config["hidden_size"] = 2, 64
    (tmp_path / "dyn" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        DynaMoForCausalLM.from_pretrained(tmp_path / "dyn")
    (tmp_path / "dyn" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        DynaMoForCausalLM.from_pretrained(tmp_path / "dyn")
