"""Dropping rejected drafts' slots from the KV cache (GraphSession.compact) against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamo_export import DynaMoForCausalLM
from runtime import DynaMoRuntime, SamplingConfig
from runtime.generation import COMPACT_SHARE, Decoder
from runtime.session import Deadline

PROMPT = "def load(path):"


@pytest.fixture(scope="module")
def t3(bpe_models):
    return DynaMoRuntime.load(bpe_models / "t3-onnx")


def test_compacted_cache_gives_the_logits_of_the_live_tokens(bpe_models, t3):
    """Feed 3 tokens, reject 2 (masked), compact, feed on: every head's logits equal PyTorch's on
    the live tokens alone, and the cache holds exactly their slots."""
    model = DynaMoForCausalLM.from_pretrained(bpe_models / "t3").eval()
    session = t3.session
    cache = session.empty_cache()
    live = [5, 17, 42, 8]
    session.forward(cache, live, list(range(4)))
    session.forward(cache, [9, 250, 251], [4, 5, 6])  # 9 accepted, two drafts rejected
    cache.live[-2:] = bytes(2)
    live.append(9)
    session.compact(cache)
    assert cache.slots == len(live) and all(cache.live)
    assert all(key.shape[2] == len(live) and key.flags.c_contiguous for key in cache.keys)
    logits = session.forward(cache, [33, 34], [5, 6])  # (heads, 2, V)
    live += [33, 34]
    with torch.no_grad():
        expected = model(torch.tensor([live])).logits[0, :, -2:].numpy()  # (heads, 2, V)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-5)


def test_compact_leaves_an_all_live_cache_alone(t3):
    cache = t3.session.empty_cache()
    t3.session.forward(cache, [5, 17, 42], [0, 1, 2])
    keys = list(cache.keys)
    t3.session.compact(cache)
    assert all(a is b for a, b in zip(keys, cache.keys, strict=True))


def run_decoder(rt: DynaMoRuntime, config: SamplingConfig, tokens: int, seed: int = 0) -> Decoder:
    no_stops = frozenset()
    decoder = Decoder(rt.session, rt.masks, config, seed, tokens, no_stops, Deadline(None))
    for _ in decoder.run(rt.tokenizer.encode(PROMPT).ids):
        pass
    return decoder


def test_long_greedy_verify_stays_greedy_ar_with_a_bounded_cache(t3):
    """A verify run long enough to compact several times: greedy ar's tokens, and the dead slots
    never above an eighth of the cache when the run ends."""
    greedy = SamplingConfig(mode="ar", temperature=0.0, repetition_penalty=1.0, adaptive=False, blur=0)
    budget = t3.manifest.model.context_length - 16
    ar = run_decoder(t3, greedy, budget)
    verify = run_decoder(t3, greedy.replace(mode="verify"), budget)
    assert verify.generated == ar.generated
    rejected = verify.stats.drafted - verify.stats.accepted
    dead = verify.cache.slots - verify.next_position
    assert rejected > 2 * dead, "the run should have compacted at least once"
    assert dead * COMPACT_SHARE <= verify.cache.slots + COMPACT_SHARE * 3  # below the trigger, or
    # the last pass's own rejections (at most 2) on top of a cache just under it


def test_sampled_verify_compacts_too(t3):
    verify = run_decoder(t3, SamplingConfig(mode="verify"), t3.manifest.model.context_length - 16, seed=3)
    rejected = verify.stats.drafted - verify.stats.accepted
    assert rejected > 2 * (verify.cache.slots - verify.next_position)
