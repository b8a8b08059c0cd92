"""dynamo-export --dtype int4 and --eval-tokens on the tiny DynaMo-T3 model: the graph, parity, the runtime.

The int4 artifact reuses the session's exported graph of the tiny model
(conftest.tiny_artifact); quantization, verification, the held-out perplexities,
the manifest and the rename run for real. The graph checks' side of int4 (what
MatMulNBits / GatherBlockQuantized may look like) is in tests/test_security.py.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest

from converters import artifact
from converters.artifact import export_artifact
from converters.cli import main, summary
from converters.errors import ExportError
from converters.optimize import Int4Config, quantize_int4
from dynamo_export.tokens import write_token_file
from runtime import DynaMoRuntime, SamplingConfig
from runtime.manifest import read_manifest

TINY_VOCAB, TINY_HEADS = 100, 3  # tests/conftest.py's tiny models
GREEDY = SamplingConfig(mode="ar", temperature=0.0, repetition_penalty=1.0, adaptive=False, blur=0)
PROMPT = [5, 17, 3, 42, 8]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A token file over the tiny vocabulary, long enough for 16 windows of the tiny context (128)."""
    path = tmp_path_factory.mktemp("heldout") / "heldout"
    write_token_file(path, np.random.default_rng(0).integers(0, TINY_VOCAB, 4000), TINY_VOCAB, eot_id=0)
    return path.with_suffix(".bin")


@pytest.fixture(scope="module")
def int4(tiny_artifact, tiny_dynamo_dir, tiny_cooccurrence_dir, heldout, tmp_path_factory):
    """The tiny DynaMo-T3 model exported --dtype int4 --eval-tokens (the session's graph, quantized here)."""

    def export_onnx(model, path, spec, opset):
        path.parent.mkdir(parents=True)
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copyfile(tiny_artifact.out / name, path.parent / name)
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact, "export_onnx", export_onnx)
        return export_artifact(
            tiny_dynamo_dir,
            out=tmp_path_factory.mktemp("int4") / "art",
            cooccurrence=tiny_cooccurrence_dir,
            dtype="int4",
            eval_tokens=heldout,
            progress=False,
        )


# -- the graph and its parity -----------------------------------------------------------------------


@pytest.mark.slow
def test_every_weight_is_4_bit_but_the_row_wise_int8_unembedding(int4, tiny_artifact):
    model = onnx.load(str(int4.out / "model.onnx"))
    ops = [(node.domain, node.op_type) for node in model.graph.node]
    fp32_ops = [node.op_type for node in onnx.load(str(tiny_artifact.out / "model.onnx")).graph.node]
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    # every float MatMul of a weight became MatMulNBits, but the unembedding: MatMulInteger
    assert ops.count(("com.microsoft", "MatMulNBits")) == fp32_ops.count("MatMul") - len(matmuls) - 1
    assert ops.count(("com.microsoft", "GatherBlockQuantized")) == 1
    float_tables = {
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    }
    assert not any(n.op_type == "Gather" and n.input[0] in float_tables for n in model.graph.node), (
        "a float table"
    )
    # (the Gathers left pick index rows: logits_to_keep's positions, shapes)
    assert all(not set(n.input) & weights for n in matmuls), "a float weight MatMul survived"
    # the attention MatMuls of two activations and the rotary angles' (past the Cos/Sin) stay float32
    assert len(matmuls) == 2 * (3 + TINY_HEADS - 1) + 1
    (unembedding,) = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    table = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[unembedding.input[1]]
    assert table.dtype == np.int8 and table.shape == (32, TINY_VOCAB) and np.abs(table).max() == 63


@pytest.mark.slow
def test_int4_unembedding_int4_quantizes_it_like_the_rest(tiny_artifact, tmp_path):
    quantize_int4(tiny_artifact.out / "model.onnx", tmp_path / "model.onnx", Int4Config(unembedding="int4"))
    model = onnx.load(str(tmp_path / "model.onnx"))
    (unembedding,) = [n for n in model.graph.node if "logits" in n.output]
    assert unembedding.op_type == "MatMulNBits", "the shared embed_out is quantized too"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in unembedding.attribute} == {
        "K": 32, "N": TINY_VOCAB, "bits": 4, "block_size": 32, "accuracy_level": 4,
    }  # fmt: skip
    assert not any(n.op_type == "MatMulInteger" for n in model.graph.node)


@pytest.mark.slow
def test_int4_passes_its_parity_check_and_reports_its_figures(int4, tiny_artifact):
    manifest = read_manifest(int4.out)
    graph = manifest.graph
    assert (graph.dtype, graph.cache_dtype, graph.logits_dtype, graph.opset) == (
        "int4",
        "float32",
        "float32",
        21,
    )
    assert manifest.producer["quantization"] == (
        "MatMulNBits/GatherBlockQuantized 4-bit RTN, block 32, asymmetric, accuracy_level 4; "
        "unembedding row-wise int8 (7-bit weights)"
    )
    verification = manifest.verification
    assert verification["status"] == "passed" and verification["tolerance"]["min_top1"] == 0.6
    assert len(verification["top1_agreement"]) == TINY_HEADS and min(verification["top1_agreement"]) >= 0.6
    assert 0 < max(verification["logits_max_abs_diff"]) < 2  # quantized: not exact, not garbage
    assert verification["greedy_tokens"] == 32
    size = sum(entry.size for path, entry in manifest.files.items() if path.startswith("model.onnx"))
    fp32 = sum((tiny_artifact.out / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
    assert size < 0.5 * fp32  # the tiny graph's fixed overhead keeps it above the 70M shape's 0.16


@pytest.mark.slow
def test_the_heldout_perplexities_are_reported_next_to_fp32(int4):
    report = int4.heldout
    assert (report.tokens, report.windows, report.seq_len) == ("heldout.bin", 16, 128)
    assert report.positions == 16 * 128
    for graph, reference in zip(report.ppl, report.ppl_fp32, strict=True):
        assert math.isfinite(graph) and abs(graph / reference - 1) < 0.05
    assert all(0.5 < a <= 1 for a in report.top1_agreement)
    assert read_manifest(int4.out).verification["heldout"] == report.to_dict()
    lines = summary(int4).splitlines()
    assert any(
        line.startswith("  quantization: MatMulNBits/GatherBlockQuantized 4-bit RTN") for line in lines
    )
    assert any(line.startswith("  held-out: heldout.bin, 16 windows x 128 tokens") for line in lines)


@pytest.mark.slow
def test_fp32_heldout_perplexity_equals_the_model(tiny_dynamo_dir, heldout, tmp_path, reuse_tiny_export):
    result = export_artifact(
        tiny_dynamo_dir,
        out=tmp_path / "fp32",
        verify=False,
        eval_tokens=heldout,
        eval_windows=4,
        progress=False,
    )
    assert result.heldout.windows == 4
    np.testing.assert_allclose(result.heldout.ppl, result.heldout.ppl_fp32, rtol=1e-5)
    assert result.heldout.top1_agreement == [1.0] * TINY_HEADS
    assert read_manifest(result.out).verification["status"].startswith("skipped")


# -- the runtime ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "dynamic", "verify"])
def test_the_runtime_generates_from_an_int4_artifact(int4, mode):
    rt = DynaMoRuntime.load(int4.out)
    result = rt.generate(PROMPT, 24, rt.default_config.replace(mode=mode), seed=0)
    assert len(result.token_ids) == 24 or result.stats.stop_reason == "stop"
    assert all(0 <= t < TINY_VOCAB for t in result.token_ids)
    assert result.stats.forward_passes >= 1


@pytest.mark.slow
def test_greedy_verify_equals_greedy_ar_on_int4(int4):
    """verify is lossless for whatever graph it runs: the int4 graph's own greedy ar, token for token."""
    rt = DynaMoRuntime.load(int4.out)
    ar = rt.generate(PROMPT, 40, GREEDY)
    verify = rt.generate(PROMPT, 40, GREEDY.replace(mode="verify"))
    assert verify.token_ids == ar.token_ids and len(ar.token_ids) > 0


# -- options, checked before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(dtype="int8", int4=Int4Config()), r"apply to --dtype int4 only, not 'int8': drop them or pass --dtype int4"),
        (dict(dtype="int4", int4=Int4Config(block_size=48)), r"--int4-block-size 48 is not one of \[16, 32, 64, 128, 256\]"),
        (dict(dtype="int4", int4=Int4Config(accuracy_level=7)), r"accuracy_level 7 is not one of ONNX Runtime's 0..4"),
        (dict(dtype="int4", int4={"block_size": 32}), "int4 must be an Int4Config"),
        (dict(dtype="int4", int4=Int4Config(unembedding="int2")), r"--int4-unembedding 'int2' is not one of \['int8', 'int4'\]"),
        (dict(eval_windows=4), "--eval-windows needs --eval-tokens"),
    ],
    ids=["int4 options with int8", "block size", "accuracy level", "not a config", "unembedding", "windows without tokens"],
)  # fmt: skip
def test_int4_and_eval_options_are_validated(tiny_dynamo_dir, tmp_path, options, message):
    with pytest.raises(ExportError, match=message):
        export_artifact(tiny_dynamo_dir, out=tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_bad_eval_windows_and_token_files_are_named(tiny_dynamo_dir, heldout, tmp_path):
    def export(**options):
        return export_artifact(tiny_dynamo_dir, out=tmp_path / "out", progress=False, **options)

    with pytest.raises(ExportError, match="--eval-windows 0 must be an integer >= 1"):
        export(eval_tokens=heldout, eval_windows=0)
    with pytest.raises(ExportError, match=r"--eval-tokens .*nowhere.json not found"):
        export(eval_tokens=tmp_path / "nowhere.bin")
    write_token_file(tmp_path / "wide", np.arange(300), vocab_size=300, eot_id=0)
    with pytest.raises(ExportError, match="vocabulary of 300 ids but the model has 100: tokenize"):
        export(eval_tokens=tmp_path / "wide.bin")
    write_token_file(tmp_path / "short", np.arange(50), vocab_size=100, eot_id=0)
    with pytest.raises(ExportError, match="holds 50 tokens, fewer than one window of 128 \\+ 3"):
        export(eval_tokens=tmp_path / "short.bin")
    assert not (tmp_path / "out").exists()


def test_the_cli_names_the_fix(tiny_dynamo_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--model", str(tiny_dynamo_dir), "--out", out, "--int4-block-size", "64"]) == 2
    assert "apply to --dtype int4 only, not 'fp32': drop them or pass --dtype int4" in capsys.readouterr().err
    assert (
        main(["--model", str(tiny_dynamo_dir), "--out", out, "--no-int4-symmetric", "--dtype", "int8"]) == 2
    )
    assert "pass --dtype int4" in capsys.readouterr().err
    assert main(["--model", str(tiny_dynamo_dir), "--out", out, "--int4-unembedding", "int4"]) == 2
    assert "--int4-unembedding apply to --dtype int4 only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_dynamo_dir), "--out", out, "--dtype", "int4", "--int4-block-size", "48"])
    assert exit_info.value.code == 2 and "invalid choice: 48" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
