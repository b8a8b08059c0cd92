"""logits_to_keep: a pass returns the rows it asks for, equal to PyTorch's at those positions, and
artifacts exported before the input existed (manifest schema 1) still load and give the same tokens."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dynamo_export import DynaMoForCausalLM
from runtime import DynaMoRuntime, SamplingConfig
from runtime.errors import ArtifactError, ManifestError
from runtime.manifest import MANIFEST_NAME, inventory, read_manifest

PROMPT = [5, 17, 3, 42, 8, 61]
MODES = [
    SamplingConfig(mode="ar"),
    SamplingConfig(mode="dynamic", eps_b=0.25),
    SamplingConfig(mode="verify"),
]


@pytest.fixture(scope="module")
def rt(tiny_artifact) -> DynaMoRuntime:
    return DynaMoRuntime.load(tiny_artifact.out)


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Every head at every position, from the PyTorch model the artifact was exported from: (n, T, V)."""
    model = DynaMoForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_the_last_row_alone_is_pytorchs_last_row(rt, tiny_dynamo_dir):
    reference = torch_logits(tiny_dynamo_dir, PROMPT)
    session = rt.session
    assert session.keeps_logits
    last = session.forward(session.empty_cache(), PROMPT, list(range(len(PROMPT))), last_only=True)
    every = session.forward(session.empty_cache(), PROMPT, list(range(len(PROMPT))))
    assert last.shape == (reference.shape[0], 1, reference.shape[2])
    assert every.shape == reference.shape
    np.testing.assert_allclose(last[:, 0], reference[:, -1], atol=1e-4)
    np.testing.assert_allclose(every, reference, atol=1e-4)


def test_the_graph_returns_exactly_the_rows_asked_for(rt, tiny_dynamo_dir):
    """Any positions, in any order, repeated: Gather semantics, as transformers' 1-D logits_to_keep."""
    reference = torch_logits(tiny_dynamo_dir, PROMPT)
    session = rt.session.session
    feeds = {
        "input_ids": np.array([PROMPT], dtype=np.int64),
        "attention_mask": np.ones((1, len(PROMPT)), dtype=np.int64),
        "position_ids": np.arange(len(PROMPT), dtype=np.int64)[None],
        **{
            name: np.zeros(spec.shape({"batch": 1, "seq": len(PROMPT), "past": 0}), np.float32)
            for name, spec in rt.session.manifest.graph.inputs.items()
            if name.startswith("past_key_values")
        },
    }
    for rows in ([4, 0, 2], [5], [1, 1]):
        logits = session.run(["logits"], {**feeds, "logits_to_keep": np.array(rows, dtype=np.int64)})[0][0]
        np.testing.assert_allclose(logits, reference[:, rows], atol=1e-4)


def schema_1_copy(source: Path, target: Path) -> Path:
    """The artifact as the exporter wrote it before logits_to_keep: the graph computes every row
    (logits_to_keep becomes Range(0, seq) inside it), the manifest says schema 1, hashes match."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    graph = model.graph
    kept = next(i for i in graph.input if i.name == "logits_to_keep")
    graph.input.remove(kept)
    for name, value in (("old_zero", 0), ("old_one", 1), ("old_seq_axis", [1])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    graph.node.insert(0, helper.make_node("Shape", ["input_ids"], ["old_shape"]))
    graph.node.insert(1, helper.make_node("Gather", ["old_shape", "old_one"], ["old_seq"], axis=0))
    graph.node.insert(2, helper.make_node("Range", ["old_zero", "old_seq", "old_one"], ["logits_to_keep"]))
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[2].dim_param = "seq"
    assert logits.type.tensor_type.elem_type == TensorProto.FLOAT
    (target / "model.onnx").write_bytes(model.SerializeToString())
    raw = json.loads((target / MANIFEST_NAME).read_text())
    raw["schema_version"] = 1
    del raw["graph"]["inputs"]["logits_to_keep"]
    raw["graph"]["outputs"]["logits"]["axes"][2] = "seq"
    (target / MANIFEST_NAME).write_text(json.dumps(raw))
    manifest = read_manifest(target)
    (target / MANIFEST_NAME).write_text(dataclasses.replace(manifest, files=inventory(target)).to_json())
    return target


def test_a_schema_1_artifact_loads_and_gives_the_same_tokens(rt, tiny_artifact, tmp_path):
    old = DynaMoRuntime.load(schema_1_copy(tiny_artifact.out, tmp_path / "v1"))
    assert not old.session.keeps_logits
    for config in MODES:
        for seed in range(3):
            new_tokens = rt.generate(PROMPT, 24, config, seed=seed).token_ids
            assert old.generate(PROMPT, 24, config, seed=seed).token_ids == new_tokens, config.mode
    rows = old.session.forward(old.session.empty_cache(), PROMPT, list(range(len(PROMPT))), last_only=True)
    assert rows.shape[1] == 1  # sliced on the CPU: callers see one contract


def test_manifests_must_match_their_schema(tiny_artifact, tmp_path):
    """A schema 2 manifest without logits_to_keep, or an unknown schema, is refused by name."""
    for name, edit, error, message in (
        (
            "no-input",
            lambda raw: raw["graph"]["inputs"].pop("logits_to_keep"),
            ArtifactError,
            "logits_to_keep",
        ),
        ("schema-9", lambda raw: raw.update(schema_version=9), ManifestError, "schema_version 9"),
    ):
        target = tmp_path / name
        shutil.copytree(tiny_artifact.out, target)
        raw = json.loads((target / MANIFEST_NAME).read_text())
        edit(raw)
        (target / MANIFEST_NAME).write_text(json.dumps(raw))
        with pytest.raises(error, match=message):
            DynaMoRuntime.load(target, check_hashes=False)
