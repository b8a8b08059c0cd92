"""Artifacts from strangers, bad inputs, threads: every case here is one that really could fail.

Most tamperings rewrite manifest.json with fresh sizes and hashes afterwards, as
an attacker who ships a whole artifact would: the hashes only catch accidents,
so the deeper checks (graph, masks, tokenizer) must hold on their own. The graph
tamperings also make ONNX Runtime's session constructor fail the test if it is
ever reached: the checks must refuse the file before ORT reads a byte of it.

Covered elsewhere and not repeated here: npz files with huge declared shapes,
out-of-range or unsorted indices, truncated or bit-flipped members
(tests/test_cooccurrence.py); an exporter whose final rename fails, and a
same-size tokenizer edit caught by its hash (tests/test_export.py,
tests/test_runtime.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import runtime.session
from converters import artifact
from converters.artifact import export_artifact
from converters.optimize import Int4Config
from runtime import DynaMoRuntime, SamplingConfig
from runtime.bounds import call_memory
from runtime.cooccurrence import CooccurrenceMask
from runtime.errors import (
    ArtifactError,
    ArtifactFileError,
    CooccurrenceFileError,
    DynaMoRuntimeError,
    GenerationTimeout,
    GraphError,
    InputError,
    ManifestError,
)
from runtime.generation import Decoder
from runtime.graph_checks import check_graph
from runtime.manifest import MANIFEST_NAME, inventory, parse_manifest, read_manifest
from runtime.onnx_reader import read_onnx
from runtime.session import Deadline

PROMPT = [5, 17, 3, 42, 8]
HYPOTHESIS = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def art(tiny_artifact) -> Path:
    """The session's tiny DynaMo-T3 artifact (fp32, weights in model.onnx.data, masks, tokenizer)."""
    return tiny_artifact.out


@pytest.fixture(scope="module")
def rt(art) -> DynaMoRuntime:
    return DynaMoRuntime.load(art)


@pytest.fixture
def copy(art, tmp_path) -> Path:
    """A private copy of the artifact at tmp_path/work/art; tmp_path/work holds the 'outside' files."""
    target = tmp_path / "work" / "art"
    shutil.copytree(art, target)
    return target


@pytest.fixture
def no_ort(monkeypatch):
    """Fail the test if ONNX Runtime is asked to open a model."""

    def refuse(*args, **kwargs):
        pytest.fail("ONNX Runtime was handed a model that the checks should have refused")

    monkeypatch.setattr(runtime.session.ort, "InferenceSession", refuse)


def rehash(root: Path) -> None:
    """Rewrite manifest.json with the current files' sizes and hashes (what a malicious packager ships)."""
    manifest = read_manifest(root)
    fresh = dataclasses.replace(manifest, files=inventory(root))
    (root / MANIFEST_NAME).write_text(fresh.to_json())


def edit_manifest(root: Path, edit) -> None:
    raw = json.loads((root / MANIFEST_NAME).read_text())
    edit(raw)
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def edit_graph(root: Path, edit) -> None:
    """Apply edit(ModelProto) to model.onnx (external data stays where it is) and rehash."""
    model = onnx.load(str(root / "model.onnx"), load_external_data=False)
    edit(model)
    (root / "model.onnx").write_bytes(model.SerializeToString())
    rehash(root)


def first_external(model: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def set_external(tensor: onnx.TensorProto, **entries: str) -> None:
    for entry in tensor.external_data:
        if entry.key in entries:
            entry.value = entries.pop(entry.key)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)


def flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x40
    path.write_bytes(bytes(data))


def write_tokenizer(path: Path, vocab: int) -> None:
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))


# -- the hand-written protobuf reader against the onnx package ---------------------------------------


def _described_by_onnx(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node]

    def value(v):
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim]
        return v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims

    return {
        "opsets": {o.domain: o.version for o in model.opset_import},
        "domains": sorted({n.domain for n in nodes}),
        "tensors": [
            (t.name, t.data_type, list(t.dims), {e.key: e.value for e in t.external_data}, len(t.raw_data))
            for t in model.graph.initializer
        ],
        "inputs": [value(v) for v in model.graph.input],
        "outputs": [value(v) for v in model.graph.output],
    }


def _described_by_reader(path: Path) -> dict:
    info = read_onnx(path)
    return {
        "opsets": info.opsets,
        "domains": sorted(info.node_domains),
        "tensors": [(t.name, t.data_type, t.dims, t.external, t.raw_bytes or 0) for t in info.tensors],
        "inputs": [(name, spec.dtype, spec.axes) for name, spec in info.inputs],
        "outputs": [(name, spec.dtype, spec.axes) for name, spec in info.outputs],
    }


def test_reader_agrees_with_onnx_on_a_real_export(art):
    ours, theirs = _described_by_reader(art / "model.onnx"), _described_by_onnx(art / "model.onnx")
    assert ours == theirs
    assert len(ours["tensors"]) > 20 and any(
        t[3] for t in ours["tensors"]
    )  # some tensors really are external
    assert ours["domains"] == [""]


def test_reader_agrees_with_onnx_on_typed_data_attributes_and_subgraphs(tmp_path):
    """Features a real export lacks: typed data fields, Constant tensors, an If subgraph, negative dims."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["inner"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.INT64, [3])],
        [helper.make_tensor("inner", TensorProto.INT64, [3], [1, -2, 3])],
    )
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("cval", TensorProto.FLOAT, [2], [1.0, 2.0])
        ),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 3])],
        [
            helper.make_tensor("words", TensorProto.STRING, [2], [b"a", b"bc"]),
            helper.make_tensor(
                "halves", TensorProto.FLOAT16, [3], np.ones(3, np.float16).tobytes(), raw=True
            ),
            helper.make_tensor("big", TensorProto.INT64, [2], [2**40, -(2**40)]),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    info = read_onnx(path)
    by_name = {t.name: t for t in info.tensors}
    assert sorted(by_name) == ["big", "cval", "halves", "inner", "words"]
    assert (by_name["words"].typed, by_name["cval"].typed, by_name["big"].typed) == ({6: 2}, {4: 2}, {7: 2})
    assert by_name["halves"].raw_bytes == 6 and by_name["inner"].typed == {7: 3}
    assert "subgraph" in by_name["inner"].where and "attribute 'value'" in by_name["cval"].where
    assert [(name, spec.dtype, spec.axes) for name, spec in info.outputs] == [("y", "int64", ["n", 3])]
    assert info.node_domains == {"": 4}  # Constant, If, and the Identity of each branch


# -- external data: where it may live ----------------------------------------------------------------

OUTSIDE = "../outside.bin"  # relative to the artifact: tmp_path/work/outside.bin


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (OUTSIDE, r"no '\.\.'"),
        ("sub/../../outside.bin", r"no '\.\.'"),
        ("ABSOLUTE", "no absolute path"),
        ("*/_ORT_MEM_ADDR_/*", "in-memory address marker"),
        ("other.bin", "only external data file is 'model.onnx.data'"),
    ],
)
def test_external_data_may_not_leave_the_artifact(copy, no_ort, location, message):
    outside = copy.parent / "outside.bin"
    outside.write_bytes((copy / "model.onnx.data").read_bytes())
    (copy / "other.bin").write_bytes(outside.read_bytes())
    location = str(outside) if location == "ABSOLUTE" else location
    offset = str(id(location)) if "_ORT_MEM_ADDR_" in location else "0"
    edit_graph(copy, lambda m: set_external(first_external(m), location=location, offset=offset))
    with pytest.raises(GraphError, match=message):
        DynaMoRuntime.load(copy)


def test_a_symlinked_data_file_is_refused_even_without_the_file_walk(copy, no_ort):
    outside = copy.parent / "outside.bin"
    shutil.move(copy / "model.onnx.data", outside)
    (copy / "model.onnx.data").symlink_to(outside)
    with pytest.raises(ArtifactFileError, match="symbolic link"):
        DynaMoRuntime.load(copy)  # the artifact walk sees it first...
    with pytest.raises(GraphError, match="symbolic link"):
        check_graph(copy, read_manifest(copy))  # ...and the graph check on its own too


def test_a_symlinked_directory_on_the_data_path_is_refused(copy):
    manifest = read_manifest(copy)
    manifest = dataclasses.replace(
        manifest, graph=dataclasses.replace(manifest.graph, external_data="sub/model.onnx.data")
    )
    real = copy.parent / "elsewhere"
    real.mkdir()
    shutil.move(copy / "model.onnx.data", real / "model.onnx.data")
    (copy / "sub").symlink_to(real, target_is_directory=True)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            set_external(tensor, location="sub/model.onnx.data")
    (copy / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(GraphError, match="symbolic link"):
        check_graph(copy, manifest)


def test_a_hard_linked_data_file_is_refused(copy, no_ort):
    os.link(copy / "model.onnx.data", copy.parent / "second-name.bin")
    with pytest.raises(ArtifactFileError, match="hard links"):
        DynaMoRuntime.load(copy)
    with pytest.raises(GraphError, match="hard links"):
        check_graph(copy, read_manifest(copy))


# -- external data: offsets, lengths and sizes -------------------------------------------------------


def _grow_dims(model):
    tensor = first_external(model)
    tensor.dims[0] *= 1000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: set_external(first_external(m), offset="1000000000"), "lie outside"),
        (lambda m: set_external(first_external(m), length="4"), "external length 4"),
        (lambda m: set_external(first_external(m), offset="-8"), "not a non-negative decimal"),
        (lambda m: set_external(first_external(m), offset="0x10"), "not a non-negative decimal"),
        (lambda m: set_external(first_external(m), owner="x"), "accepts only"),
        (_grow_dims, "external length"),
        (lambda m: first_external(m).ClearField("data_location"), "data_location is not EXTERNAL"),
        (lambda m: setattr(first_external(m), "raw_data", b"\0" * 4), "both external and inline"),
    ],
    ids=["offset", "length", "negative", "hex", "unknown key", "dims", "location flag", "inline too"],
)
def test_external_ranges_must_fit_the_tensor_and_the_file(copy, no_ort, edit, message):
    edit_graph(copy, edit)
    with pytest.raises(GraphError, match=message):
        DynaMoRuntime.load(copy)


def test_a_truncated_data_file_is_refused_by_its_size_and_by_the_ranges(copy, no_ort):
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ArtifactFileError, match="truncated or replaced"):
        DynaMoRuntime.load(copy)
    rehash(copy)
    with pytest.raises(GraphError, match=r"lie outside 'model\.onnx\.data'"):
        DynaMoRuntime.load(copy)


def test_inline_data_must_match_its_dims(copy, no_ort):
    def shrink(model):
        inline = next(
            t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL and t.raw_data
        )
        inline.raw_data = inline.raw_data[:-1]

    edit_graph(copy, shrink)
    with pytest.raises(GraphError, match="raw_data has"):
        DynaMoRuntime.load(copy)


# -- what the graph may contain ----------------------------------------------------------------------


def _foreign_domain(model):
    model.graph.node[0].domain = "com.example.custom"
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))


def _sparse_initializer(model):
    values = helper.make_tensor("sv", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("si", TensorProto.INT64, [1], [0])
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))


def _local_function(model):
    model.functions.append(
        helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [])
    )


def _subgraph(model):
    branch = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["b_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b_out", TensorProto.INT64, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch)
    )


def _renamed_input(model):
    model.graph.input[0].name = "tokens"
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == "input_ids":
                node.input[i] = "tokens"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_foreign_domain, r"domains \['com.example.custom'\]"),
        (_sparse_initializer, "sparse initializer"),
        (_local_function, "model-local function"),
        (_subgraph, "a subgraph in node 'If' attribute 'else_branch'"),
        (lambda m: m.opset_import[0].__setattr__("version", 17), "opset is"),
        (_renamed_input, r"missing \['input_ids'\], unexpected \['tokens'\]"),
        (
            lambda m: m.graph.output[0].type.tensor_type.__setattr__("elem_type", TensorProto.FLOAT16),
            "logits",
        ),
    ],
    ids=["domain", "sparse", "function", "subgraph", "opset", "input name", "logits dtype"],
)
def test_the_graph_holds_only_what_the_exporter_emits(copy, no_ort, edit, message):
    edit_graph(copy, edit)
    with pytest.raises(GraphError, match=message):
        DynaMoRuntime.load(copy)


def test_a_graph_input_without_a_shape_is_refused(copy, no_ort):
    edit_graph(copy, lambda m: m.graph.input[0].type.tensor_type.ClearField("shape"))
    assert read_onnx(copy / "model.onnx").inputs[0] == ("input_ids", None)
    with pytest.raises(GraphError, match="input_ids: the graph gives it no tensor shape"):
        DynaMoRuntime.load(copy)


def test_the_fused_graph_domain_is_accepted(copy):
    """com.microsoft is what --optimize emits; the reader must not reject a legitimate fused export."""

    def fake_fusion(model):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    edit_graph(copy, fake_fusion)
    check_graph(copy, read_manifest(copy))


# -- int4: ONNX Runtime's quantized-weight operators, only as the quantizer writes them ---------------


@pytest.fixture(scope="module")
def int4_art(art, tiny_dynamo_dir, tmp_path_factory) -> Path:
    """The tiny DynaMo-T3 graph exported --dtype int4 --int4-unembedding int4 (weights inline; no
    verification: test_int4.py's job): the tamperings below edit the unembedding's MatMulNBits."""

    def export_onnx(model, path, spec, opset):
        path.parent.mkdir(parents=True)
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copyfile(art / name, path.parent / name)
        return path

    out = tmp_path_factory.mktemp("int4") / "art"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact, "export_onnx", export_onnx)
        export_artifact(
            tiny_dynamo_dir,
            out=out,
            dtype="int4",
            int4=Int4Config(unembedding="int4"),
            verify=False,
            progress=False,
        )
    return out


@pytest.fixture
def int4_copy(int4_art, tmp_path) -> Path:
    target = tmp_path / "int4"
    shutil.copytree(int4_art, target)
    return target


def _node(model, op_type, output=None):
    return next(
        n for n in model.graph.node if n.op_type == op_type and (output is None or output in n.output)
    )


def _set_attribute(op_type, name, value, output=None):
    def edit(model):
        node = _node(model, op_type, output)
        for attribute in node.attribute:
            if attribute.name == name:
                attribute.CopyFrom(helper.make_attribute(name, value))
                return
        node.attribute.append(helper.make_attribute(name, value))

    return edit


def _reshape_initializer(op_type, index, dims):
    def edit(model):
        name = _node(model, op_type, "logits" if op_type == "MatMulNBits" else None).input[index]
        tensor = next(t for t in model.graph.initializer if t.name == name)
        new = dims(list(tensor.dims))
        del tensor.dims[:]
        tensor.dims.extend(new)

    return edit


def _weight_from_a_node(model):
    node = _node(model, "MatMulNBits", "logits")
    model.graph.node.insert(0, helper.make_node("Identity", [node.input[1]], ["laundered"]))
    node.input[1] = "laundered"


def _mistyped_attribute(model):
    """`i` set on an attribute whose type says FLOAT: ONNX Runtime would not read it as an integer."""
    attribute = next(a for a in _node(model, "MatMulNBits", "logits").attribute if a.name == "K")
    attribute.type = onnx.AttributeProto.FLOAT


def _twice_named_weight(model):
    """A second initializer under B's name: which one would ONNX Runtime use?"""
    node = _node(model, "MatMulNBits", "logits")
    model.graph.initializer.append(
        helper.make_tensor(node.input[1], TensorProto.UINT8, [1], b"\x00", raw=True)
    )


def _repeat_attribute(model):
    node = _node(model, "MatMulNBits", "logits")
    node.attribute.append(helper.make_attribute("K", 4096))


def _default_domain(model):
    _node(model, "MatMulNBits", "logits").domain = ""


def _uint8_embedding(model):
    name = _node(model, "GatherBlockQuantized").input[0]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.data_type = TensorProto.UINT8
    tensor.dims[1] //= (
        2  # the same bytes, now as uint8: what ORT reads with bits=4 and the checks did not admit
    )


def test_the_reader_sees_what_onnx_sees_in_an_int4_graph(int4_art):
    model = onnx.load(str(int4_art / "model.onnx"), load_external_data=False)
    info = read_onnx(int4_art / "model.onnx")
    expected = [
        (n.name, n.domain, n.op_type, list(n.input), {a.name: a.i for a in n.attribute})
        for n in model.graph.node
        if n.domain == "com.microsoft"
    ]
    found = [(n.name, n.domain, n.op_type, n.inputs, n.attributes) for n in info.contrib_nodes]
    assert found == expected and len(found) == 1 + 5 * 4 + 1  # embedding, 5 layers x 4, embed_out
    assert sorted((t.name, t.data_type, list(t.dims)) for t in model.graph.initializer) == sorted(
        (t.name, t.data_type, t.dims) for t in info.initializers.values()
    )
    assert {t.data_type for t in info.initializers.values()} >= {TensorProto.UINT4, TensorProto.UINT8}


def test_an_int4_artifact_passes_the_checks_and_loads(int4_art):
    info = check_graph(int4_art, read_manifest(int4_art))
    assert {op for domain, op in info.op_types if domain == "com.microsoft"} == {
        "MatMulNBits",
        "GatherBlockQuantized",
    }
    assert DynaMoRuntime.load(int4_art).generate(PROMPT, 4, SamplingConfig(mode="ar"), seed=0).token_ids


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_attribute("MatMulNBits", "K", 4096, "logits"), r"B .* of uint8 \[100, 1, 16\]; its attributes imply uint8 \[100, 128, 16\]"),
        (_set_attribute("MatMulNBits", "N", 101, "logits"), r"imply uint8 \[101, 1, 16\]"),
        (_set_attribute("MatMulNBits", "bits", 8, "logits"), "has bits 8, .* expected 4 bits"),
        (_set_attribute("MatMulNBits", "block_size", 48, "logits"), r"block_size 48, .* blocks of \[16, 32"),
        (_set_attribute("MatMulNBits", "accuracy_level", 9, "logits"), "accuracy_level 9; ONNX Runtime knows 0..4"),
        (_set_attribute("MatMulNBits", "K", 32.0, "logits"), "expected integers K, N, bits, block_size"),
        (_set_attribute("MatMulNBits", "g_idx_hint", 1, "logits"), r"has attributes \['K', 'N', .*'g_idx_hint'"),
        (_reshape_initializer("MatMulNBits", 2, lambda d: [d[0] * d[1]]), r"scales .* float32 \[100\]; its attributes imply float32 \[100, 1\]"),
        (_weight_from_a_node, "B 'laundered' from somewhere other than an initializer"),
        (_repeat_attribute, r"repeats the attributes \['K'\]"),
        (_mistyped_attribute, "expected integers K, N, bits, block_size"),
        (_twice_named_weight, "a name the graph gives two initializers"),
        (_default_domain, "operator MatMulNBits in domain 'ai.onnx': dynamo-export emits it only in 'com.microsoft'"),
        (_set_attribute("GatherBlockQuantized", "quantize_axis", 0), "quantize_axis 0, .* expected rows gathered"),
        (_set_attribute("GatherBlockQuantized", "bits", 8), r"has attributes \['bits', 'block_size'"),
        (_reshape_initializer("GatherBlockQuantized", 2, lambda d: [d[0], d[1] + 1]), r"scales .* float32 \[100, 2\]; its attributes imply float32 \[100, 1\]"),
        (_uint8_embedding, "reads data that is not a 2-D uint4/int4 initializer"),
    ],
    ids=[
        "K past B", "N past B", "bits", "block size", "accuracy level", "float attribute", "unknown attribute",
        "flat scales", "B from a node", "repeated attribute", "mistyped attribute", "twice-named weight",
        "default domain", "quantize axis", "gather bits", "gather scales", "uint8 embedding",
    ],
)  # fmt: skip
def test_quantized_operators_only_as_the_quantizer_writes_them(int4_copy, no_ort, edit, message):
    edit_graph(int4_copy, edit)
    with pytest.raises(GraphError, match=message):
        DynaMoRuntime.load(int4_copy)


def test_quantized_operators_only_in_an_int4_graph(int4_copy, no_ort):
    edit_manifest(int4_copy, lambda raw: raw["graph"].__setitem__("dtype", "int8"))
    with pytest.raises(
        GraphError, match=r"22 quantized-weight nodes .* calls 'int8': .* only with --dtype int4"
    ):
        DynaMoRuntime.load(int4_copy)


@settings(HYPOTHESIS, max_examples=100)
@given(
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    insert=st.binary(max_size=16),
)
def test_fuzz_int4_graph_reading_raises_only_typed_errors(int4_art, tmp_path_factory, cut, flips, insert):
    root = tmp_path_factory.mktemp("graph4")
    for name in ("model.onnx", MANIFEST_NAME):
        shutil.copyfile(int4_art / name, root / name)
    (root / "model.onnx").write_bytes(_mutate((root / "model.onnx").read_bytes(), cut, flips, insert))
    with contextlib.suppress(GraphError):
        check_graph(root, read_manifest(int4_art))


# -- files, hashes, truncation and bit flips ---------------------------------------------------------


def test_a_truncated_model_fails_its_size_and_then_the_reader(copy, no_ort):
    model = copy / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ArtifactFileError, match="truncated or replaced"):
        DynaMoRuntime.load(copy)
    rehash(copy)
    with pytest.raises(GraphError, match="not a valid ONNX model"):
        DynaMoRuntime.load(copy)


def test_a_bit_flipped_data_file_or_mask_fails_its_hash(copy):
    flip_byte(copy / "model.onnx.data", 1234)
    with pytest.raises(ArtifactFileError, match=r"model\.onnx\.data does not match its sha256"):
        DynaMoRuntime.load(copy)
    flip_byte(copy / "model.onnx.data", 1234)
    flip_byte(copy / "cooccurrence" / "pairs.npz", 80)
    with pytest.raises(ArtifactFileError, match=r"cooccurrence/pairs\.npz does not match its sha256"):
        DynaMoRuntime.load(copy)


def test_a_bit_flipped_or_truncated_mask_with_fresh_hashes_fails_its_own_checks(copy):
    pairs = copy / "cooccurrence" / "pairs.npz"
    pairs.write_bytes(pairs.read_bytes()[:-30])
    rehash(copy)
    with pytest.raises(CooccurrenceFileError, match="corrupt"):
        DynaMoRuntime.load(copy)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-5]), ManifestError, "not valid JSON"),
        (
            lambda p: p.write_bytes(p.read_bytes().replace(b'"schema_version"', b'"schema_versiom"')),
            ManifestError,
            "unknown keys",
        ),
        (lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()), ManifestError, "not UTF-8"),
        (
            lambda p: p.write_bytes(p.read_bytes().replace(b'"sha256": "', b'"sha256": "0', 1)),
            ManifestError,
            "64 lowercase hex",
        ),
    ],
    ids=["truncated", "renamed key", "bad bytes", "hash digit"],
)
def test_a_damaged_manifest_is_refused(copy, damage, error, message):
    damage(copy / MANIFEST_NAME)
    with pytest.raises(error, match=message):
        DynaMoRuntime.load(copy)


def test_missing_and_extra_files_are_named(copy):
    (copy / "notes.txt").write_text("not part of the artifact")
    with pytest.raises(ArtifactFileError, match=r"not listed in the manifest.*notes\.txt"):
        DynaMoRuntime.load(copy)
    (copy / "notes.txt").unlink()
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactFileError, match=r"missing: \['tokenizer\.json'\]"):
        DynaMoRuntime.load(copy)


def test_an_object_array_in_a_shipped_mask_is_never_unpickled(copy, monkeypatch):
    pairs = copy / "cooccurrence" / "pairs.npz"
    with zipfile.ZipFile(pairs) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(pairs, "w") as zf:
        for name, data in members.items():
            if name == "data.npy":
                buffer = io.BytesIO()
                np.save(buffer, np.array([1.0, "x", 2.0], dtype=object), allow_pickle=True)
                data = buffer.getvalue()
            zf.writestr(name, data)
    rehash(copy)
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CooccurrenceFileError, match="object"):
        DynaMoRuntime.load(copy)


# -- vocabularies --------------------------------------------------------------------------------------


def test_a_tokenizer_larger_than_the_graph_is_refused(copy):
    write_tokenizer(copy / "tokenizer.json", 150)
    rehash(copy)
    with pytest.raises(ArtifactError, match="ids reach 149 but the graph has only 100 tokens"):
        DynaMoRuntime.load(copy)


def test_a_tokenizer_with_few_entries_but_large_ids_is_refused(copy):
    """get_vocab_size() counts entries (2 here); the check must look at the ids themselves."""
    Tokenizer(WordLevel({"t0": 0, "far": 5000}, unk_token="t0")).save(str(copy / "tokenizer.json"))
    rehash(copy)
    with pytest.raises(ArtifactError, match="ids reach 5000"):
        DynaMoRuntime.load(copy)


def test_masks_of_another_vocabulary_are_refused(copy, make_cooccurrence):
    shutil.rmtree(copy / "cooccurrence")
    make_cooccurrence(copy / "cooccurrence", 90)
    rehash(copy)
    with pytest.raises(CooccurrenceFileError, match="vocabulary of 90 tokens but the model has 100"):
        DynaMoRuntime.load(copy)


def test_a_manifest_vocabulary_that_is_not_the_graphs_is_refused(copy, no_ort, make_cooccurrence):
    """Manifest, masks and tokenizer agree on 90 tokens; only the graph's logits say 100."""

    def shrink(raw):
        raw["model"]["vocab_size"] = 90
        raw["graph"]["outputs"]["logits"]["axes"][3] = 90

    edit_manifest(copy, shrink)
    shutil.rmtree(copy / "cooccurrence")
    make_cooccurrence(copy / "cooccurrence", 90)
    write_tokenizer(copy / "tokenizer.json", 90)
    rehash(copy)
    with pytest.raises(GraphError, match=r"logits: graph axes \['batch', 3, 'kept', 100\]"):
        DynaMoRuntime.load(copy)


def test_a_manifest_whose_io_disagrees_with_its_own_model_section_is_refused(copy, no_ort):
    edit_manifest(copy, lambda raw: raw["model"].update(num_token_heads=2, num_cache_layers=4))
    with pytest.raises(GraphError, match="not those of 4 cache layers"):
        DynaMoRuntime.load(copy)


# -- bad inputs ----------------------------------------------------------------------------------------


def test_token_ids_and_prompts_out_of_range(rt):
    with pytest.raises(InputError, match="outside the vocabulary"):
        rt.generate([3, -1], 4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        rt.generate(np.array([3, 2**40]), 4)
    with pytest.raises(InputError, match="context is 128"):
        rt.generate(" ".join(["t7"] * 200), 4)  # text that tokenizes past the context


def test_max_new_tokens_far_past_the_context_stops_cleanly(rt):
    result = rt.generate(PROMPT, 10**12, SamplingConfig(mode="ar"), seed=0)
    assert result.stats.stop_reason in ("context", "stop")


@pytest.mark.parametrize("limit", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_time_limits_are_input_errors(rt, limit):
    with pytest.raises(InputError, match="time_limit_s"):
        rt.generate(PROMPT, 4, time_limit_s=limit)


# -- bounds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ar", "dynamic", "verify"])
def test_the_memory_estimate_bounds_the_real_cache(rt, mode):
    config = SamplingConfig(mode=mode, eps_b=0.0, temperature=1.0)
    new_tokens = 40
    decoder = Decoder(rt.session, rt.masks, config, 3, new_tokens, frozenset(), Deadline(None))
    for _ in decoder.run(PROMPT):
        pass
    estimate = call_memory(rt.manifest, len(PROMPT), new_tokens, mode)
    real_bytes = sum(a.nbytes for a in decoder.cache.keys + decoder.cache.values)
    assert decoder.cache.slots <= estimate.cache_slots
    assert real_bytes * 2 <= estimate.cache_bytes  # the estimate counts pasts and presents alive together
    if mode == "ar":  # one token per pass: the bound is exact
        assert decoder.cache.slots == estimate.cache_slots == len(PROMPT) + new_tokens - 1


def test_max_memory_bytes_refuses_calls_that_could_exceed_it(art, rt):
    small = call_memory(rt.manifest, len(PROMPT), 8, "verify").total
    capped = DynaMoRuntime.load(art, max_memory_bytes=small)
    assert len(capped.generate(PROMPT, 8, SamplingConfig(mode="verify"), seed=0).token_ids) == 8
    with pytest.raises(InputError, match="max_memory_bytes"):
        capped.generate(PROMPT, 9, SamplingConfig(mode="verify"), seed=0)
    with pytest.raises(InputError, match="max_memory_bytes"):
        capped.generate(PROMPT * 10, 8, SamplingConfig(mode="verify"), seed=0)
    with pytest.raises(InputError, match="max_memory_bytes"):
        DynaMoRuntime.load(art, max_memory_bytes=0)


def test_a_tiny_time_limit_stops_the_call_and_the_runtime_stays_usable(rt):
    config = SamplingConfig(mode="ar")
    with pytest.raises(GenerationTimeout, match="time limit"):
        rt.generate(PROMPT, 120, config, seed=1, time_limit_s=1e-4)
    assert (
        rt.generate(PROMPT, 12, config, seed=1).token_ids == rt.generate(PROMPT, 12, config, seed=1).token_ids
    )


# -- threads -------------------------------------------------------------------------------------------


def test_concurrent_calls_equal_single_threaded_ones(rt):
    """12 calls (3 modes x 4 seeds) on 4 threads of one runtime; the first four start together."""
    modes = ("dynamic", "verify", "ar")
    config = {mode: SamplingConfig(mode=mode, eps_b=0.3, temperature=1.0) for mode in modes}
    jobs = [(mode, seed) for seed in range(4) for mode in modes]
    expected = {job: rt.generate(PROMPT, 30, config[job[0]], seed=job[1]).token_ids for job in jobs}
    start = threading.Barrier(4)

    def run(index: int) -> list[int]:
        mode, seed = jobs[index]
        if index < 4:
            start.wait()
        return rt.generate(PROMPT, 30, config[mode], seed=seed).token_ids

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = dict(zip(jobs, pool.map(run, range(len(jobs))), strict=True))
    assert got == expected
    assert len({tuple(ids) for ids in expected.values()}) > len(jobs) // 2  # seeds really change the output


# -- fuzzing: only typed errors ------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["{", "{0}", "{i}", "../x", "/abs", "a\x00", "float64", "tensor(float)", 2**80, -1]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@settings(HYPOTHESIS, max_examples=200)
@given(data=st.data())
def test_fuzz_manifest_parsing_raises_only_typed_errors(art, data):
    raw = json.loads((art / MANIFEST_NAME).read_text())
    paths = [p for p in _paths(raw) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = raw
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = data.draw(JSON)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    try:
        manifest = parse_manifest(json.dumps(raw))
        SamplingConfig.from_manifest_defaults(manifest.sampling_defaults)
        call_memory(manifest, 3, 5, "verify")
        check_graph(art, manifest)  # the real graph against a mutated manifest
    except DynaMoRuntimeError:
        pass


@settings(HYPOTHESIS, max_examples=150)
@given(
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
)
def test_fuzz_manifest_bytes_raise_only_typed_errors(art, tmp_path_factory, cut, flips):
    data = bytearray((art / MANIFEST_NAME).read_bytes())
    for index, mask in flips:
        data[index % len(data)] ^= mask
    root = tmp_path_factory.mktemp("manifest")
    (root / MANIFEST_NAME).write_bytes(bytes(data[: max(1, cut % (len(data) + 1))]))
    with contextlib.suppress(DynaMoRuntimeError):
        read_manifest(root)


def _mutate(data: bytes, cut: int, flips, insert: bytes) -> bytes:
    out = bytearray(data)
    for index, mask in flips:
        out[index % len(out)] ^= mask
    at = cut % (len(out) + 1)
    return bytes(out[:at] + insert + out[at:]) if insert else bytes(out[: max(1, at)])


@settings(HYPOTHESIS, max_examples=200)
@given(
    member=st.sampled_from(["pairs.npz", "triples.npz", "cooccurrence.json"]),
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    insert=st.binary(max_size=16),
)
def test_fuzz_mask_loading_raises_only_typed_errors(art, tmp_path_factory, member, cut, flips, insert):
    root = tmp_path_factory.mktemp("mask") / "cooccurrence"
    shutil.copytree(art / "cooccurrence", root)
    (root / member).write_bytes(_mutate((root / member).read_bytes(), cut, flips, insert))
    with contextlib.suppress(DynaMoRuntimeError):
        CooccurrenceMask.load(root, expected_vocab_size=100)


@settings(HYPOTHESIS, max_examples=150)
@given(
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    insert=st.binary(max_size=16),
)
def test_fuzz_graph_reading_raises_only_typed_errors(art, tmp_path_factory, cut, flips, insert):
    root = tmp_path_factory.mktemp("graph")
    for name in ("model.onnx", "model.onnx.data", MANIFEST_NAME):
        shutil.copyfile(art / name, root / name)
    (root / "model.onnx").write_bytes(_mutate((root / "model.onnx").read_bytes(), cut, flips, insert))
    with contextlib.suppress(GraphError):
        check_graph(root, read_manifest(art))


# -- the exporter --------------------------------------------------------------------------------------


def test_an_exporter_killed_while_writing_the_graph_leaves_the_old_artifact_and_no_temp(
    tiny_dynamo_dir, tmp_path, monkeypatch, reuse_tiny_export
):
    out = tmp_path / "art"
    export_artifact(tiny_dynamo_dir, out=out, verify=False, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save = artifact.save_onnx

    def killed_mid_write(model, path, external):
        real_save(model, path, external)
        with open(path, "r+b") as f:  # half-written file, then the process is interrupted
            f.truncate(path.stat().st_size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_onnx", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(tiny_dynamo_dir, out=out, verify=False, progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "a staging directory was left behind"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    DynaMoRuntime.load(out)
