"""The ONNX Runtime decoding loop against transformers and against its own modes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import GPTNeoXForCausalLM

from dynamo_export import DynaMoForCausalLM
from runtime import (
    ArtifactFileError,
    DynaMoRuntime,
    InputError,
    ProviderError,
    SamplingConfig,
)
from runtime.session import GraphSession

GREEDY = SamplingConfig(mode="ar", temperature=0.0, repetition_penalty=1.0, adaptive=False, blur=0)
PROMPT = "def load(path):"


@pytest.fixture(scope="module")
def artifacts(bpe_models):
    return bpe_models


@pytest.fixture(scope="module")
def t3(artifacts):
    return DynaMoRuntime.load(artifacts / "t3-onnx")


def test_greedy_ar_equals_transformers_generate(artifacts):
    base = GPTNeoXForCausalLM.from_pretrained(artifacts / "base").eval()
    rt = DynaMoRuntime.load(artifacts / "base-onnx")
    prompt = rt.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        expected = base.generate(
            torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=0, pad_token_id=0
        )[0, len(prompt) :].tolist()
    if 0 in expected:  # our runtime stops at eos without emitting it
        expected = expected[: expected.index(0)]
    result = rt.generate(prompt, max_new_tokens=64, config=GREEDY)
    assert result.token_ids == expected
    assert len(expected) > 8


def test_t3_head1_greedy_equals_base_greedy(artifacts, t3):
    """Head 1 of the converted model is the base model: same tokens through either artifact."""
    base = DynaMoRuntime.load(artifacts / "base-onnx")
    assert t3.generate(PROMPT, 48, GREEDY).token_ids == base.generate(PROMPT, 48, GREEDY).token_ids


def test_greedy_verify_equals_greedy_ar(t3):
    ar = t3.generate(PROMPT, 60, GREEDY)
    verify = t3.generate(PROMPT, 60, GREEDY.replace(mode="verify"))
    assert verify.token_ids == ar.token_ids
    # head_init="copy": the drafts are head 1's own guesses one step early, so some must be accepted.
    assert verify.stats.drafted > 0
    assert verify.stats.forward_passes <= ar.stats.forward_passes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_with_eps_b_1_is_exactly_ar(t3, seed):
    config = SamplingConfig(mode="ar")
    ar = t3.generate(PROMPT, 40, config, seed=seed)
    dynamic = t3.generate(PROMPT, 40, config.replace(mode="dynamic", eps_b=1.0), seed=seed)
    assert dynamic.token_ids == ar.token_ids
    assert dynamic.stats.emissions == {1: dynamic.stats.forward_passes}


def test_dynamic_with_eps_b_0_always_emits_n(t3):
    # Without masks and thresholds the grid always has mass, so eps_b = 0 never backs off.
    config = SamplingConfig(mode="dynamic", eps_b=0.0, alpha_c=0.0, adaptive=False, blur=0)
    result = t3.generate(PROMPT, 60, config, seed=3)
    full = result.stats.emissions.get(3, 0)
    assert result.stats.backoffs == 0
    assert set(result.stats.emissions) == {3}
    assert result.stats.forward_passes == full
    assert len(result.token_ids) == 60 or result.stats.stop_reason == "stop"


def test_dynamic_with_masks_emits_several_tokens_per_pass_and_accounts_for_them(t3):
    result = t3.generate(PROMPT, 50, SamplingConfig(eps_b=0.2), seed=5)
    stats = result.stats
    assert sum(stats.emissions.values()) == stats.forward_passes
    emitted = sum(k * v for k, v in stats.emissions.items())
    assert emitted >= len(result.token_ids)  # the last pass may be cut by max_new_tokens
    assert stats.forward_passes * 3 - emitted == stats.backoffs
    assert stats.decode_ort_s > 0 and stats.decode_sampling_s > 0


@pytest.mark.slow
def test_verify_sampling_matches_ar_distribution(artifacts):
    """Speculative acceptance through the real cache keeps head 1's distribution exactly.

    Reference: the exact probability of every 2-token continuation under head 1 of the
    PyTorch model restricted to its top-4 per step (T = 1, no penalty): 16 cells.
    Chi-square goodness of fit; false-alarm rate 1e-3 at a fixed set of seeds.
    """
    rt = DynaMoRuntime.load(artifacts / "t3-onnx")
    model = DynaMoForCausalLM.from_pretrained(artifacts / "t3")
    prompt = rt.tokenizer.encode(PROMPT).ids
    k = 4
    config = SamplingConfig(
        mode="verify", top_k=k, temperature=1.0, repetition_penalty=1.0, adaptive=False, blur=0
    )
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, 0, -1]
        top1 = torch.topk(first, k).indices
        p1 = torch.softmax(first[top1], -1)
        second = model(torch.tensor([[*prompt, int(t)] for t in top1])).logits[:, 0, -1]  # (k, V)
    top2 = torch.topk(second, k, dim=-1).indices
    p2 = torch.softmax(torch.gather(second, 1, top2), -1)
    exact = {
        (int(a), int(b)): float(p1[i] * p2[i, j]) for i, a in enumerate(top1) for j, b in enumerate(top2[i])
    }
    trials = 3000
    results = [rt.generate(prompt, 2, config, seed=s) for s in range(trials)]
    counts = Counter(tuple(r.token_ids) for r in results)
    assert set(counts) <= set(exact), "verify emitted a continuation outside head 1's top-k"
    cells = sorted(exact)
    observed = np.array([counts.get(c, 0) for c in cells])
    expected = np.array([exact[c] for c in cells])
    expected *= trials / expected.sum()  # float32 logits: the sum is 1 only to ~1e-7
    p_value = scipy.stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, f"verify sampling departs from head 1's distribution (p = {p_value:.2e})"
    # The drafts were really used: some passes accepted a draft (copy-initialised heads agree often).
    assert sum(r.stats.accepted for r in results) > 0


def test_stream_reassembles_to_generate_text(t3):
    config = SamplingConfig(eps_b=0.3)
    pieces = list(t3.stream(PROMPT, 40, config, seed=11))
    assert len(pieces) > 1
    assert "".join(pieces) == t3.generate(PROMPT, 40, config, seed=11).text


def test_stop_token_and_stop_string_end_generation(t3):
    free = t3.generate(PROMPT, 30, GREEDY)
    stop_token = free.token_ids[5]
    cut = t3.generate(PROMPT, 30, GREEDY.replace(stop=(stop_token,)))
    assert cut.token_ids == free.token_ids[: free.token_ids.index(stop_token)]
    assert cut.stats.stop_reason == "stop"
    target = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    by_string = t3.generate(PROMPT, 30, GREEDY.replace(stop=(target,)))
    assert target in by_string.text and by_string.stats.stop_reason == "stop"
    assert len(by_string.token_ids) < len(free.token_ids)


def test_generation_reaching_the_context_stops_cleanly(t3):
    context = t3.manifest.model.context_length
    prompt = [5] * (context - 4)
    for mode in ("ar", "dynamic", "verify"):
        result = t3.generate(prompt, 100, SamplingConfig(mode=mode, eps_b=0.0), seed=0)
        assert result.stats.stop_reason == "context", mode
        assert len(prompt) + len(result.token_ids) <= context + 2  # the last pass may emit past its input


def test_bad_inputs_are_rejected_with_clear_errors(t3):
    vocab = t3.manifest.model.vocab_size
    with pytest.raises(InputError, match="empty"):
        t3.generate("", 5)
    with pytest.raises(InputError, match="empty"):
        t3.generate([], 5)
    with pytest.raises(InputError, match=r"outside the vocabulary \[0, 320\)"):
        t3.generate([1, vocab], 5)
    with pytest.raises(InputError, match="context"):
        t3.generate([1] * t3.manifest.model.context_length, 5)
    with pytest.raises(InputError, match="max_new_tokens"):
        t3.generate([1, 2], 0)
    with pytest.raises(InputError, match="integer token ids"):
        t3.generate([1.5, 2], 3)


def test_cuda_where_unavailable_names_the_fix(artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA; the error path cannot be exercised here")
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        DynaMoRuntime.load(artifacts / "t3-onnx", provider="cuda")
    assert DynaMoRuntime.load(artifacts / "t3-onnx", provider="auto").provider == "cpu"


def test_io_binding_path_equals_the_plain_one(artifacts):
    """CUDA's code path (the cache in ORT's own buffers, bound to the next pass) run on the CPU
    provider: the same logits pass after pass, a masked slot included, and the same tokens in
    every mode, rejected verify drafts included."""
    plain = DynaMoRuntime.load(artifacts / "t3-onnx")
    bound = DynaMoRuntime.load(artifacts / "t3-onnx")
    bound.session = GraphSession(str(bound.root / bound.manifest.graph.file), bound.manifest, io_binding=True)
    assert bound.session.io_binding and not plain.session.io_binding
    caches = plain.session.empty_cache(), bound.session.empty_cache()
    position = 0
    for feed in ([5, 17, 42], [7, 9], [11]):
        positions = list(range(position, position + len(feed)))
        a, b = (
            rt.session.forward(cache, feed, positions)
            for rt, cache in zip((plain, bound), caches, strict=True)
        )
        np.testing.assert_array_equal(a, b)
        position += len(feed)
        if len(feed) == 2:  # a rejected draft: its slot is masked, the next token takes its position
            for cache in caches:
                cache.live[-1:] = bytes(1)
            position -= 1
    rejected = 0
    for config in (GREEDY, SamplingConfig(mode="dynamic"), SamplingConfig(mode="verify")):
        for seed in range(2):
            expected = plain.generate(PROMPT, 24, config=config, seed=seed)
            result = bound.generate(PROMPT, 24, config=config, seed=seed)
            assert result.token_ids == expected.token_ids
            rejected += result.stats.drafted - result.stats.accepted
    assert rejected > 0, "verify should have rejected drafts"


def test_artifact_whose_files_fail_their_hashes_is_refused(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifacts / "t3-onnx", copy)
    data = bytearray((copy / "tokenizer.json").read_bytes())
    data[100] ^= 0x01
    (copy / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactFileError, match=r"tokenizer\.json does not match its sha256"):
        DynaMoRuntime.load(copy)


def test_runtime_imports_and_runs_without_torch(artifacts):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "optimum"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from runtime import DynaMoRuntime, SamplingConfig
        rt = DynaMoRuntime.load({str(artifacts / "t3-onnx")!r})
        out = rt.generate("x = ", 8, SamplingConfig(), seed=0)
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")]
        print(len(out.token_ids))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 1


def test_stats_are_json_ready(t3):
    stats = t3.generate(PROMPT, 10, seed=0).stats.to_dict()
    json.dumps(stats)
    assert stats["new_tokens"] == 10 and stats["forward_passes"] >= 4
