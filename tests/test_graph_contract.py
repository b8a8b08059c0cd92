"""A graph that lies about its outputs at run time: every pass is held to the manifest before the
sampler or the cache sees it, and ONNX Runtime's own failures come out as the runtime's typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import DynaMoRuntime, GraphError, InferenceError, SamplingConfig

MODES = [SamplingConfig(mode="ar"), SamplingConfig(mode="dynamic", eps_b=0.0), SamplingConfig(mode="verify")]


class LyingSession:
    """Wraps an onnxruntime.InferenceSession and rewrites what `run` returns (logits, presents)."""

    def __init__(self, real, rewrite) -> None:
        self.real, self.rewrite = real, rewrite

    def run(self, names, feed, run_options=None):
        return self.rewrite(self.real.run(names, feed, run_options))

    def __getattr__(self, name):
        return getattr(self.real, name)


def five_heads(outputs):
    logits = outputs[0]
    return [np.concatenate([logits, logits[:, :2]], axis=1), *outputs[1:]]


def one_head(outputs):
    return [outputs[0][:, :1], *outputs[1:]]


def wider_vocabulary(outputs):
    logits = outputs[0]
    return [np.concatenate([logits, logits[..., :7]], axis=-1), *outputs[1:]]


def float64_logits(outputs):
    return [outputs[0].astype(np.float64), *outputs[1:]]


def cache_that_does_not_grow(outputs):
    return [outputs[0], *(p[:, :, :1] for p in outputs[1:])]


def float16_cache(outputs):
    return [outputs[0], *(p.astype(np.float16) for p in outputs[1:])]


@pytest.fixture
def runtime(tiny_artifact) -> DynaMoRuntime:
    return DynaMoRuntime.load(tiny_artifact.out)


@pytest.mark.parametrize(
    ("rewrite", "named"),
    [
        (five_heads, "logits"),
        (one_head, "logits"),
        (wider_vocabulary, "logits"),
        (float64_logits, "logits float64"),
        (cache_that_does_not_grow, "present.0.key"),
        (float16_cache, "present.0.key float16"),
    ],
)
@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_a_graph_whose_outputs_break_the_manifest_is_refused_in_every_mode(runtime, rewrite, named, config):
    runtime.session.session = LyingSession(runtime.session.session, rewrite)
    with pytest.raises(GraphError, match=rf"outputs break its manifest.*{named}"):
        runtime.generate([5, 6, 7], 8, config, seed=0)


def test_a_lie_that_starts_after_the_prefill_is_caught_on_that_pass(runtime):
    passes = []

    def lie_on_the_third_pass(outputs):
        passes.append(1)
        return five_heads(outputs) if len(passes) == 3 else outputs

    runtime.session.session = LyingSession(runtime.session.session, lie_on_the_third_pass)
    with pytest.raises(GraphError, match="expected float32\\[1, 3, 1,"):
        runtime.generate([5, 6, 7], 8, SamplingConfig(mode="ar"), seed=0)
    assert len(passes) == 3


def test_onnx_runtime_failures_are_typed(runtime):
    class Failing:
        def run(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation")

        def __getattr__(self, name):
            return getattr(real, name)

    real = runtime.session.session
    runtime.session.session = Failing()
    with pytest.raises(InferenceError, match=r"ONNX Runtime failed in a forward pass.*bad allocation"):
        runtime.generate([5, 6, 7], 4, SamplingConfig(mode="verify"), seed=0)


def test_an_honest_graph_passes_the_check_in_every_mode(runtime):
    for config in MODES:
        stats = runtime.generate([5, 6, 7], 12, config.replace(stop=()), seed=0).stats
        assert stats.forward_passes >= 2 and stats.new_tokens >= 1
