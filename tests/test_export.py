"""dynamo-export on tiny random models: the I/O contract, parity, the shared projection, the artifact.

The contract below is written out literally from the issue rather than taken
from converters/io_spec.py, and parity is checked against transformers'
GPTNeoXForCausalLM (head 1) and the PyTorch model run without a cache (heads
2..n), not against the exporter's own verifier. Tests marked slow share one
export of the tiny DynaMo-T3 model per session (conftest.tiny_artifact, 10-20 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file
from transformers import GPTNeoXForCausalLM

from converters import artifact
from converters.artifact import export_artifact
from converters.cli import main
from converters.errors import ExportError, ParityError
from converters.io_spec import io_spec
from converters.optimize import save_onnx
from converters.verify import verify_graph
from dynamo_export import DynaMoForCausalLM
from dynamo_export.errors import CheckpointError
from runtime import ApproximateVerifyWarning, DynaMoRuntime
from runtime.config import SamplingConfig
from runtime.contract import TensorSpec
from runtime.manifest import read_manifest, verify_files

TINY_VOCAB, TINY_HEADS = 100, 3  # tests/conftest.py's tiny models
CACHE_LAYERS = 3 + TINY_HEADS - 1  # stem 0..1, head 1's layer, two extra heads
FLOAT, INT64, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16


def contract(heads: int, cache_layers: int, cache=FLOAT) -> tuple[list, list]:
    """(name, elem type, axes) of every input and output, in order, as the issue states them."""
    inputs = [
        ("input_ids", INT64, ["batch", "seq"]),
        ("attention_mask", INT64, ["batch", "past + seq"]),
        ("position_ids", INT64, ["batch", "seq"]),
        ("logits_to_keep", INT64, ["kept"]),
    ]
    outputs = [("logits", FLOAT, ["batch", heads, "kept", TINY_VOCAB])]
    for i in range(cache_layers):
        for kind in ("key", "value"):
            inputs.append((f"past_key_values.{i}.{kind}", cache, ["batch", 4, "past", 8]))
            outputs.append((f"present.{i}.{kind}", cache, ["batch", 4, "past + seq", 8]))
    return inputs, outputs


def graph_io(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [
                    d.dim_param if d.HasField("dim_param") else d.dim_value
                    for d in v.type.tensor_type.shape.dim
                ],
            )
            for v in values
        ]

    return describe(graph.input), describe(graph.output)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the graph --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_input_and_output_matches_the_contract(tiny_artifact):
    inputs, outputs = graph_io(tiny_artifact.out / "model.onnx")
    expected_inputs, expected_outputs = contract(TINY_HEADS, CACHE_LAYERS)
    assert inputs == expected_inputs
    assert outputs == expected_outputs

    manifest = read_manifest(tiny_artifact.out)
    dtype_names = {FLOAT: "float32", INT64: "int64"}
    assert manifest.graph.inputs == {n: TensorSpec(dtype_names[t], axes) for n, t, axes in expected_inputs}
    assert manifest.graph.outputs == {n: TensorSpec(dtype_names[t], axes) for n, t, axes in expected_outputs}


@pytest.mark.slow
def test_the_heads_share_one_embed_out_matmul(tiny_artifact, tiny_dynamo_dir):
    weight = load_file(tiny_dynamo_dir / "model.safetensors")["embed_out.weight"]  # (V, H)
    model = onnx.load(str(tiny_artifact.out / "model.onnx"))
    copies = [
        init.name
        for init in model.graph.initializer
        if (array := onnx.numpy_helper.to_array(init)).shape in (weight.shape, weight.T.shape)
        and (np.array_equal(array, weight) or np.array_equal(array, weight.T))
    ]
    assert len(copies) == 1, "embed_out's weight must be stored once"
    readers = [node for node in model.graph.node if copies[0] in node.input]
    assert [node.op_type for node in readers] in (["MatMul"], ["Gemm"])
    assert (
        readers[0].output[0] == "logits"
    )  # applied to the stacked (B, n, T, H) states, straight to the output


@pytest.mark.slow
def test_parity_with_transformers_from_another_working_directory(
    tiny_artifact, tiny_gpt_neox_dir, tiny_dynamo_dir, tmp_path, monkeypatch
):
    """Batch 2: prefill (past 0), a 1-token step, a 3-token step, each fed its own cache back."""
    monkeypatch.chdir(tmp_path)
    session = ort.InferenceSession(os.path.relpath(tiny_artifact.out / "model.onnx"))
    base = GPTNeoXForCausalLM.from_pretrained(tiny_gpt_neox_dir).eval()
    dynamo = DynaMoForCausalLM.from_pretrained(tiny_dynamo_dir)
    ids = torch.randint(0, TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_head1 = base(ids).logits.numpy()  # (B, T, V), no cache
        expected_all = dynamo(ids).logits.numpy()  # (B, n, T, V), no cache

    past = {
        f"past_key_values.{i}.{k}": np.zeros((2, 4, 0, 8), np.float32)
        for i in range(CACHE_LAYERS)
        for k in ("key", "value")
    }
    start = 0
    for seq in (6, 1, 3):
        end = start + seq
        feeds = {
            "input_ids": ids[:, start:end].numpy(),
            "attention_mask": np.ones((2, end), np.int64),
            "position_ids": np.tile(np.arange(start, end), (2, 1)),
            "logits_to_keep": np.arange(seq),
            **past,
        }
        logits, *presents = session.run(None, feeds)
        assert logits.shape == (2, TINY_HEADS, seq, TINY_VOCAB)
        np.testing.assert_allclose(logits[:, 0], expected_head1[:, start:end], atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, expected_all[:, :, start:end], atol=1e-4, rtol=0)
        past = dict(zip(past, presents, strict=True))
        start = end
    assert past["past_key_values.0.key"].shape == (2, 4, 10, 8)


@pytest.mark.slow
def test_verification_figures_are_recorded(tiny_artifact):
    verification = read_manifest(tiny_artifact.out).verification
    assert verification["status"] == "passed"
    assert len(verification["logits_max_abs_diff"]) == TINY_HEADS
    assert max(verification["logits_max_abs_diff"]) <= 1e-4
    assert len(verification["present_max_abs_diff"]) == 2 * CACHE_LAYERS
    assert any(case.startswith("batch=2 prefill") for case in verification["cases"])
    assert any(case.startswith("batch=1 step seq=3") for case in verification["cases"])
    assert verification["greedy_matched"] == verification["greedy_tokens"] == 32


@pytest.mark.slow
def test_verification_fails_loudly_on_a_wrong_graph(tiny_artifact, tiny_dynamo_dir, tmp_path):
    """Perturb one weight of head 3 by 1%: every case must be reported for head 3 and nothing else."""
    model = onnx.load(str(tiny_artifact.out / "model.onnx"))
    weight = load_file(tiny_dynamo_dir / "model.safetensors")["heads.2.layer.mlp.dense_4h_to_h.weight"]
    init = next(t for t in model.graph.initializer if np.array_equal(onnx.numpy_helper.to_array(t), weight.T))
    init.CopyFrom(onnx.numpy_helper.from_array(weight.T * 1.01, init.name))
    save_onnx(model, tmp_path / "wrong" / "model.onnx", external=False)
    dynamo = DynaMoForCausalLM.from_pretrained(tiny_dynamo_dir)
    spec = io_spec(dynamo.config)
    with pytest.raises(ParityError) as error:
        verify_graph(dynamo, tmp_path / "wrong" / "model.onnx", spec, "fp32")
    message = str(error.value)
    assert "logits head 3 max|diff|" in message and "batch=2 step seq=3" in message  # every case is listed
    assert "logits head 1 max|diff|" not in message and "present" not in message  # only head 3's norm changed

    model.graph.output[0].name = "scores"
    next(n for n in model.graph.node if "logits" in n.output).output[0] = "scores"
    save_onnx(model, tmp_path / "renamed" / "model.onnx", external=False)
    with pytest.raises(ParityError, match="differ from the contract"):
        verify_graph(dynamo, tmp_path / "renamed" / "model.onnx", spec, "fp32")


# -- the artifact -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_runtime_reader_accepts_the_artifact(tiny_artifact, tiny_dynamo_dir, tiny_cooccurrence_dir):
    out = tiny_artifact.out
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert sorted(manifest.files) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    model = manifest.model
    assert (model.architecture, model.num_token_heads, model.num_cache_layers) == (
        "dynamo_neox",
        3,
        CACHE_LAYERS,
    )
    assert (model.num_attention_heads, model.head_dim, model.vocab_size, model.context_length) == (
        4,
        8,
        100,
        128,
    )
    assert manifest.graph.external_data == "model.onnx.data"
    assert (manifest.graph.dtype, manifest.graph.cache_dtype, manifest.graph.opset) == ("fp32", "float32", 18)
    assert manifest.tokenizer == "tokenizer.json"
    assert sha256(out / "tokenizer.json") == sha256(tiny_dynamo_dir / "tokenizer.json")
    assert manifest.cooccurrence == "cooccurrence"
    assert sha256(out / "cooccurrence" / "pairs.npz") == sha256(tiny_cooccurrence_dir / "pairs.npz")
    assert SamplingConfig.from_manifest_defaults(manifest.sampling_defaults) == SamplingConfig()
    assert manifest.producer["torch"] == torch.__version__
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "staging directories left behind"


@pytest.mark.slow
def test_a_gpt_neox_checkpoint_exports_as_one_head(tiny_gpt_neox_dir, tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["--model", str(tiny_gpt_neox_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity: fp32" in printed and "model.onnx" in printed and "time:" in printed

    manifest = read_manifest(out)
    assert (manifest.model.architecture, manifest.model.num_token_heads, manifest.model.num_cache_layers) == (
        "gpt_neox",
        1,
        3,
    )
    assert manifest.graph.external_data is None and not (out / "model.onnx.data").exists()  # auto, 200 KB
    assert manifest.sampling_defaults["mode"] == "ar"
    inputs, outputs = graph_io(out / "model.onnx")
    assert (inputs, outputs) == contract(1, 3)

    base = GPTNeoXForCausalLM.from_pretrained(tiny_gpt_neox_dir).eval()
    ids = torch.randint(0, TINY_VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = base(ids).logits.numpy()
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((1, 5), np.int64),
        "position_ids": np.arange(5)[None],
        "logits_to_keep": np.arange(5),
    }
    feeds.update({name: np.zeros((1, 4, 0, 8), np.float32) for name, _, _ in inputs[4:]})
    logits = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_int8_reports_its_own_parity_figures(tiny_dynamo_dir, tmp_path, reuse_tiny_export, tiny_artifact):
    result = export_artifact(tiny_dynamo_dir, out=tmp_path / "int8", dtype="int8", progress=False)
    manifest = read_manifest(result.out)
    assert (manifest.graph.dtype, manifest.graph.cache_dtype, manifest.graph.logits_dtype) == (
        "int8",
        "float32",
        "float32",
    )
    ops = {node.op_type for node in onnx.load(str(result.out / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, "no quantized MatMul in the int8 graph"
    # dynamic quantization couples the fed rows: verify on int8 says it only approximates ar
    rt = DynaMoRuntime.load(result.out)
    with pytest.warns(ApproximateVerifyWarning, match="--dtype fp32, fp16 or int4"):
        rt.generate([1, 2, 3], 4, rt.default_config.replace(mode="verify"), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximateVerifyWarning)
        rt.generate([1, 2, 3], 4, rt.default_config.replace(mode="ar"), seed=0)
    verification = manifest.verification
    assert verification["tolerance"]["min_top1"] == 0.9 and verification["tolerance"]["max_abs_diff"] is None
    assert len(verification["top1_agreement"]) == TINY_HEADS
    assert min(verification["top1_agreement"]) >= 0.9
    assert 0 < max(verification["logits_max_abs_diff"]) < 0.5  # quantized: not exact, not garbage
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < sum(
        (tiny_artifact.out / n).stat().st_size for n in ("model.onnx", "model.onnx.data")
    )


@pytest.mark.slow
def test_fp16_keeps_the_cache_io_consistent(tiny_dynamo_dir, tmp_path, reuse_tiny_export):
    result = export_artifact(tiny_dynamo_dir, out=tmp_path / "fp16", dtype="fp16", progress=False)
    manifest = read_manifest(result.out)
    assert (manifest.graph.cache_dtype, manifest.graph.logits_dtype) == ("float16", "float32")
    inputs, outputs = graph_io(result.out / "model.onnx")
    expected_inputs, expected_outputs = contract(TINY_HEADS, CACHE_LAYERS, cache=FLOAT16)
    assert inputs == expected_inputs
    assert outputs == expected_outputs  # logits stay float32 (contract() writes FLOAT for logits)
    assert all(
        spec.dtype == "float16" for name, spec in manifest.graph.inputs.items() if name.startswith("past")
    )
    verification = manifest.verification
    assert verification["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert min(verification["top1_agreement"]) >= 0.95


@pytest.mark.slow
def test_a_failed_final_rename_leaves_nothing_behind(
    tiny_dynamo_dir, tmp_path, monkeypatch, reuse_tiny_export
):
    def failing_replace(src, dst):
        raise OSError("injected failure in the final rename")

    monkeypatch.setattr(artifact.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "new" / "art", verify=False, progress=False)
    assert list(tmp_path.iterdir()) == [], "the export left files or directories behind"


@pytest.mark.slow
def test_an_existing_artifact_is_replaced_only_with_force(
    tiny_dynamo_dir, tmp_path, monkeypatch, reuse_tiny_export
):
    out = tmp_path / "art"
    export_artifact(tiny_dynamo_dir, out=out, verify=False, progress=False)
    before = sha256(out / "manifest.json")
    with pytest.raises(ExportError, match="--force"):
        export_artifact(tiny_dynamo_dir, out=out, verify=False, progress=False)
    assert sha256(out / "manifest.json") == before

    real_replace = os.replace

    def fail_on_install(src, dst):
        if Path(dst) == out and Path(src).name == "artifact":
            raise OSError("injected failure in the final rename")
        real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", fail_on_install)
    with pytest.raises(OSError, match="injected"):
        export_artifact(tiny_dynamo_dir, out=out, verify=False, force=True, progress=False)
    assert sha256(out / "manifest.json") == before, "the old artifact was not restored"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]

    monkeypatch.setattr(artifact.os, "replace", real_replace)
    (out / "stale.txt").write_text("from an older export")
    export_artifact(tiny_dynamo_dir, out=out, verify=False, force=True, progress=False)
    assert not (out / "stale.txt").exists()
    verify_files(out, read_manifest(out))
    assert json.loads((out / "manifest.json").read_text())["verification"]["status"].startswith("skipped")


def test_force_never_replaces_a_directory_that_is_not_an_artifact(tiny_dynamo_dir, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(ExportError, match=r"without manifest\.json"):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "notes", force=True, progress=False)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


# -- clear errors, raised before any work -----------------------------------------------------------


def test_a_missing_model_path_is_named(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        export_artifact(tmp_path / "nowhere", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_not_gpt_neox_is_rejected(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        export_artifact(tmp_path / "llama", out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_a_cooccurrence_vocabulary_mismatch_is_rejected(tiny_dynamo_dir, tmp_path, make_cooccurrence):
    cooccurrence = make_cooccurrence(tmp_path / "cooc50", vocab_size=50)
    with pytest.raises(ExportError, match=r"vocabulary of 50 tokens but the model has 100"):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "out", cooccurrence=cooccurrence, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cooc50"]


def test_an_unwritable_out_is_rejected(tiny_dynamo_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ExportError, match="is not a directory"):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "file" / "art", progress=False)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(ExportError, match="not writable"):
            export_artifact(tiny_dynamo_dir, out=tmp_path / "locked" / "art", progress=False)


def test_invalid_options_are_listed_together(tiny_dynamo_dir, tmp_path):
    with pytest.raises(ExportError) as error:
        export_artifact(tiny_dynamo_dir, out=tmp_path / "o", dtype="bf16", opset=11, external_data="never")
    message = str(error.value)
    assert "--dtype 'bf16'" in message and "--opset 11" in message and "--external-data 'never'" in message
