"""The graph's contract (runtime/contract.py) against the table it documents, spelled out here by hand."""

from __future__ import annotations

import pytest

from runtime.contract import (
    CACHE_DTYPE,
    ORT_PROVIDERS,
    PROVIDERS,
    WEIGHT_DTYPES,
    TensorSpec,
    cache_layer_count,
    graph_io,
    interleaved,
)
from runtime.manifest import GraphInfo


def test_graph_io_is_the_documented_table_in_the_graphs_order():
    inputs, outputs = graph_io(
        num_cache_layers=2,
        num_token_heads=3,
        num_attention_heads=4,
        head_dim=8,
        vocab_size=100,
        cache_dtype="float16",
    )
    assert list(inputs) == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "logits_to_keep",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert inputs["attention_mask"] == TensorSpec("int64", ["batch", "past + seq"])
    assert inputs["past_key_values.1.value"] == TensorSpec("float16", ["batch", 4, "past", 8])
    assert outputs["logits"] == TensorSpec("float32", ["batch", 3, "kept", 100])
    assert inputs["logits_to_keep"] == TensorSpec("int64", ["kept"])
    assert outputs["present.0.key"] == TensorSpec("float16", ["batch", 4, "past + seq", 8])
    inputs["past_key_values.0.key"].axes[0] = "changed"  # every spec owns its axes
    assert inputs["past_key_values.0.value"].axes[0] == "batch"


def test_shapes_derive_the_total_length():
    spec = TensorSpec("int64", ["batch", "past + seq"])
    assert spec.shape({"batch": 2, "seq": 3, "past": 5}) == (2, 8)
    kept = TensorSpec("int64", ["kept"])
    assert kept.shape({"batch": 2, "seq": 3, "past": 5}) == (3,)  # every fed row unless asked
    assert kept.shape({"batch": 2, "seq": 3, "past": 5, "kept": 1}) == (1,)


def test_cache_layout_and_the_manifests_default_patterns():
    assert cache_layer_count(num_hidden_layers=6, num_token_heads=3) == 8
    assert interleaved("k{i}", "v{i}", 2) == ["k0", "v0", "k1", "v1"]
    graph = GraphInfo("model.onnx", None, "fp32", "float32", "float32", 18, {}, {})
    assert (graph.past_key, graph.present_value) == ("past_key_values.{i}.key", "present.{i}.value")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_providers_end_with_the_cpu_fallback(device):
    assert device in PROVIDERS and ORT_PROVIDERS[device][-1] == "CPUExecutionProvider"


def test_every_weight_dtype_has_a_cache_dtype():
    assert set(CACHE_DTYPE) == set(WEIGHT_DTYPES)
