"""The shipped reference models (artifacts/) load, fit together and round-trip text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from runtime import CooccurrenceMask

ROOT = Path(__file__).resolve().parents[1] / "artifacts"
BASE, T3 = ROOT / "reference-base", ROOT / "reference-t3"
TEXT = "Return a new dictionary initialized from an optional positional argument.\n>>> d = {'a': 1}\n"


@pytest.fixture(scope="module")
def models():
    base = GPTNeoXForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    t3 = DynaMoForCausalLM.from_pretrained(T3).eval()
    return base, t3


def test_checkpoints_have_the_documented_architecture(models):
    base, t3 = models
    config = base.config
    assert (config.num_hidden_layers, config.hidden_size, config.rotary_pct) == (6, 256, 0.25)
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert t3.config.num_token_heads == 3
    assert t3.config.vocab_size == config.vocab_size
    assert len(t3.stem) == config.num_hidden_layers - 1
    extra = sum(p.numel() for p in t3.parameters()) - sum(p.numel() for p in base.parameters())
    layer = sum(p.numel() for p in base.gpt_neox.layers[-1].parameters())
    final_ln = sum(p.numel() for p in base.gpt_neox.final_layer_norm.parameters())
    assert extra == 2 * (layer + final_ln)


def test_weights_are_stored_in_fp16_safetensors():
    for directory in (BASE, T3):
        header_len = int.from_bytes((directory / "model.safetensors").read_bytes()[:8], "little")
        header = json.loads((directory / "model.safetensors").read_bytes()[8 : 8 + header_len])
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes == {"F16"}, directory


def test_tokenizer_round_trips_text_and_matches_the_models(models):
    base, _ = models
    for directory in (BASE, T3):
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        assert tokenizer.get_vocab_size() == base.config.vocab_size
        assert tokenizer.decode(tokenizer.encode(TEXT).ids) == TEXT
        assert tokenizer.token_to_id("<|endoftext|>") == base.config.eos_token_id


def test_masks_match_the_vocabulary_and_know_common_pairs():
    tokenizer = Tokenizer.from_file(str(T3 / "tokenizer.json"))
    mask = CooccurrenceMask.load(T3 / "cooccurrence", expected_vocab_size=tokenizer.get_vocab_size())
    assert mask.orders == (2, 3)
    ids = tokenizer.encode(" the value of the").ids
    pair = mask.weights([ids[:1], ids[1:2]])
    assert pair.shape == (1, 1) and pair[0, 0] > 0


def test_head1_of_t3_is_close_to_the_base_it_came_from(models):
    """Stage 2 trains the transferred weights at LR_B = 1e-5: head 1 must still agree with the base."""
    base, t3 = models
    tokenizer = Tokenizer.from_file(str(T3 / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    with torch.no_grad():
        top_base = base(ids).logits.argmax(-1)
        top_t3 = t3(ids).logits[:, 0].argmax(-1)
    assert (top_base == top_t3).float().mean().item() >= 0.8
