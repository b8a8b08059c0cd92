"""Fuzz targets, one per loader: whatever a stranger's artifact holds, only the runtime's typed errors escape.

Each target builds hostile inputs with hypothesis from the shape of the real thing, not only by
flipping bytes (tests/test_security.py flips and truncates the manifest, the masks and the graph
and calls each checker on its own; that is not repeated here). Here the inputs go through the
loader the runtime really uses, end to end: `DynaMoRuntime.load` (read once, checks, ONNX Runtime
from bytes, a first generate call) for the manifest and the graph, `parse_tokenizer` plus
encoding and decoding for tokenizer.json, the in-memory mask reader for the .npz files, and a
session whose outputs lie for the run-time contract. A test passes when every example ends in
success or a `DynaMoRuntimeError`; any other exception fails it, and a crash ends the run.

Bounds: derandomized (the same examples every run, so a failure reproduces), a few dozen
examples per target and a per-example deadline, so each target runs in seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from runtime import DynaMoRuntime, SamplingConfig
from runtime.cooccurrence_file import load_cooccurrence
from runtime.errors import DynaMoRuntimeError
from runtime.manifest import MANIFEST_NAME
from runtime.tokenizer_policy import call, parse_tokenizer

FUZZ = settings(
    derandomize=True,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
MODES = [SamplingConfig(mode="ar"), SamplingConfig(mode="dynamic", eps_b=0.0), SamplingConfig(mode="verify")]


@pytest.fixture(scope="module")
def art(tiny_artifact) -> Path:
    return tiny_artifact.out


@pytest.fixture(scope="module")
def scratch(art, tmp_path_factory) -> Path:
    """A copy of the artifact the targets overwrite file by file (each example restores what it changed)."""
    root = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(art, root)
    return root


def _load_and_run(root: Path) -> None:
    """The whole loader, then one short call per mode: what a user of a stranger's artifact does.
    Typed errors end the example (recorded as a hypothesis event: --hypothesis-show-statistics)."""
    try:
        rt = DynaMoRuntime.load(root, max_memory_bytes=1 << 30)
        event("loaded")
        for config in MODES:
            rt.generate([1, 2, 3], max_new_tokens=3, config=config, seed=0, time_limit_s=20)
        event("generated")
    except DynaMoRuntimeError as exc:
        event(type(exc).__name__)


def _rehashed(manifest_text: str, rel: str, data: bytes) -> str:
    """The manifest with `rel`'s size and sha256 set to `data`'s, as an attacker would ship it."""
    raw = json.loads(manifest_text)
    raw["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return json.dumps(raw)


# -- manifest.json ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.sampled_from(["model.onnx", "model.onnx.data", "../model.onnx", "cooccurrence", "float16", "{i}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Fields whose values change what the loader reads, allocates or feeds ONNX Runtime.
MANIFEST_FIELDS = [
    ("model", "num_token_heads"), ("model", "vocab_size"), ("model", "context_length"),
    ("model", "num_attention_heads"), ("model", "head_dim"), ("model", "hidden_size"),
    ("model", "num_hidden_layers"), ("model", "num_cache_layers"), ("model", "eos_token_id"),
    ("graph", "file"), ("graph", "external_data"), ("graph", "dtype"), ("graph", "cache_dtype"),
    ("graph", "logits_dtype"), ("graph", "opset"), ("graph", "past_key"), ("graph", "present_value"),
    ("tokenizer",), ("cooccurrence",), ("sampling_defaults",), ("files",),
    *[("sampling_defaults", key) for key in ("mode", "eps_b", "top_k", "temperature", "alpha_c", "blur",
                                            "static_threshold", "repetition_penalty", "stop")],
]  # fmt: skip


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_manifest_through_the_whole_loader(art, scratch, data):
    """Model sizes, paths, dtypes and file lists changed in a manifest that is otherwise the real one:
    the load (and a first call) either works or raises a typed error; ONNX Runtime never sees a graph
    the manifest does not describe."""
    original = (art / MANIFEST_NAME).read_text()
    raw = json.loads(original)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(MANIFEST_FIELDS), label="field")
        parent = raw
        try:
            for key in path[:-1]:
                parent = parent[key]
            current = parent[path[-1]]
        except (KeyError, TypeError):
            continue  # an earlier edit replaced the section this field lives in
        if isinstance(current, int) and not isinstance(current, bool):
            value = data.draw(
                st.sampled_from([0, 1, current - 1, current + 1, current * 2, 2**31 - 1, 2**62, -1])
                | st.just(current)  # unchanged: the example reaches ONNX Runtime and the sampler
                | JSON
            )
        elif isinstance(current, float):
            value = data.draw(st.floats(allow_nan=True) | st.sampled_from([0.0, 1.0, 1e308, -1.0]) | JSON)
        else:
            value = data.draw(JSON)
        parent[path[-1]] = value
    try:
        (scratch / MANIFEST_NAME).write_text(json.dumps(raw))
        _load_and_run(scratch)
    finally:
        (scratch / MANIFEST_NAME).write_text(original)


# -- tokenizer.json -------------------------------------------------------------------------------------

TEXT = st.text(max_size=24) | st.sampled_from(["", " ", "\u00e9\u0301", "a" * 300, "\ud7ff\ue000", "x\x00y"])
COMPONENT_TYPES = {
    "normalizer": ["NFC", "NFKD", "Lowercase", "Strip", "Prepend", "Replace", "Sequence", "Precompiled",
                   "BertNormalizer", "StripAccents", "Nmt"],
    "pre_tokenizer": ["ByteLevel", "Whitespace", "Split", "Sequence", "Metaspace", "Digits", "Punctuation",
                      "CharDelimiterSplit", "UnicodeScripts"],
    "decoder": ["ByteLevel", "Replace", "Strip", "Sequence", "Fuse", "ByteFallback", "CTC", "Metaspace"],
    "post_processor": ["ByteLevel", "TemplateProcessing", "BertProcessing", "RobertaProcessing", "Sequence"],
}  # fmt: skip
PARAMS = st.dictionaries(
    st.sampled_from(
        [
            "pattern",
            "content",
            "prepend",
            "behavior",
            "invert",
            "strip_left",
            "strip_right",
            "start",
            "stop",
            "add_prefix_space",
            "trim_offsets",
            "use_regex",
            "replacement",
            "prepend_scheme",
            "split",
            "individual_digits",
            "precompiled_charsmap",
            "normalizers",
            "pretokenizers",
            "decoders",
            "lowercase",
        ]
    ),
    st.none()
    | st.booleans()
    | st.integers(-5, 10**9)
    | st.text(max_size=40)
    | st.fixed_dictionaries({"String": st.text(max_size=20)})
    | st.fixed_dictionaries({"Regex": st.sampled_from(["(a+)+$", ".*", "\\s+", "(", "a{0,100000}"])})
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["NFC", "Lowercase", "Replace", "ByteLevel"])})
    ),
    max_size=4,
)


def _component(kind: str):
    return st.none() | st.builds(
        lambda t, params: {"type": t, **params}, st.sampled_from(COMPONENT_TYPES[kind]), PARAMS
    )


@settings(FUZZ, max_examples=120)
@given(
    components=st.fixed_dictionaries({}, optional={kind: _component(kind) for kind in COMPONENT_TYPES}),
    model=st.fixed_dictionaries(
        {},
        optional={
            "dropout": st.none() | st.floats(0, 1),
            "type": st.sampled_from(["BPE", "Unigram", "X"]),
            "byte_fallback": st.booleans(),
            "unk_token": st.none() | st.text(max_size=4),
        },
    ),
    top=st.fixed_dictionaries(
        {},
        optional={
            "truncation": st.none() | st.fixed_dictionaries({"max_length": st.integers(0, 9)}),
            "padding": st.none() | st.fixed_dictionaries({"length": st.integers(0, 9)}),
            "added_tokens": st.lists(
                st.fixed_dictionaries(
                    {"id": st.integers(-1, 2**33), "content": st.text(max_size=70), "special": st.booleans()}
                ),
                max_size=3,
            ),
        },
    ),
    text=TEXT,
    ids=st.lists(st.integers(0, 120), max_size=64),
)
def test_fuzz_tokenizer_json_through_the_policy_and_tokenizers(art, components, model, top, text, ids):
    """The artifact's own tokenizer.json with components, model settings and top-level options swapped
    for ones the exporter never writes (regexes, charsmaps, templates, dropout, truncation, huge
    added tokens): the policy refuses them or `tokenizers` runs them, and every failure, Rust panics
    included, is a typed error; encoding and decoding the admitted ones stay typed too."""
    raw = json.loads((art / "tokenizer.json").read_text())
    raw.update(components)
    raw.update(top)
    raw["model"] = {**raw["model"], **model}
    try:
        tokenizer = parse_tokenizer(json.dumps(raw).encode(), "tokenizer.json")
    except DynaMoRuntimeError as exc:
        event(f"refused: {str(exc).split(':')[0][:40]}")
        return
    event("admitted")
    with contextlib.suppress(DynaMoRuntimeError):
        call(lambda: tokenizer.encode(text).ids, "encode", DynaMoRuntimeError)
    with contextlib.suppress(DynaMoRuntimeError):
        decoded = call(lambda: tokenizer.decode(ids, skip_special_tokens=False), "decode", DynaMoRuntimeError)
        assert len(decoded) <= 64 * 1024, "the policy admitted a decoder that amplifies 64 tokens"


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=512) | st.text(max_size=200).map(str.encode))
def test_fuzz_tokenizer_bytes(data):
    """Arbitrary bytes as tokenizer.json: not UTF-8, not JSON, not an object, deep nesting."""
    with contextlib.suppress(DynaMoRuntimeError):
        parse_tokenizer(data, "tokenizer.json")
    with contextlib.suppress(DynaMoRuntimeError):
        parse_tokenizer(b"[" * 100_000 + data, "tokenizer.json")


# -- co-occurrence masks (.npz) -------------------------------------------------------------------------


def _npy(dtype: str, shape: tuple, payload: bytes, fortran: bool, version: int) -> bytes:
    """An .npy member with a header that may lie about its payload (dtype, shape, byte count)."""
    header = {"descr": dtype, "fortran_order": fortran, "shape": shape}
    out = io.BytesIO()
    writer = np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0
    writer(out, header)  # the magic string and the header
    out.write(payload)
    return out.getvalue()


MEMBER = st.builds(
    _npy,
    st.sampled_from(["<i4", "<f4", "<i8", "|S3", "|O", ">i4", "<f2", "<c16", "V8"]),
    st.lists(st.integers(0, 2**40) | st.integers(-3, 8), max_size=3).map(tuple),
    st.binary(max_size=64) | st.just(pickle.dumps(["not", "unpickled"])),
    st.booleans(),
    st.sampled_from([1, 2]),
)
MEMBER_NAMES = ["data.npy", "indices.npy", "indptr.npy", "format.npy", "shape.npy", "_is_array.npy", "x.npy"]


@settings(FUZZ, max_examples=100)
@given(
    data=st.data(),
    members=st.dictionaries(st.sampled_from(MEMBER_NAMES), MEMBER, max_size=7),
    meta_edits=st.dictionaries(
        st.sampled_from(
            [
                "vocab_size",
                "orders",
                "nnz",
                "ngram_positions",
                "min_count",
                "eot_id",
                "value_dtype",
                "format_version",
                "tokenizer_fingerprint",
            ]
        ),
        JSON
        | st.integers(0, 2**63)
        | st.sampled_from([[2], [2, 3], {"2": 2**31 - 1}, {"2": 5, "3": 2**31 - 1}]),
        max_size=3,
    ),
    compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]),
)
def test_fuzz_mask_files_in_memory(art, monkeypatch, data, members, meta_edits, compression):
    """Mask directories as the loader now receives them (bytes, runtime/artifact_files.py): a header
    with lying sizes and the .npz members rebuilt with lying .npy headers, pickled payloads, foreign
    members and compressions. Typed errors only, nothing unpickled, no allocation past the cap."""
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a mask was unpickled"))
    real = {p.name: p.read_bytes() for p in (art / "cooccurrence").iterdir()}
    meta = json.loads(real["cooccurrence.json"])
    meta.update(meta_edits)
    contents = dict(real, **{"cooccurrence.json": json.dumps(meta).encode()})
    target = data.draw(st.sampled_from(["pairs.npz", "triples.npz"]), label="file")
    if members:
        with zipfile.ZipFile(io.BytesIO(real[target])) as zf:
            kept = {name: zf.read(name) for name in zf.namelist()}
        kept.update(members)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
            for name, payload in kept.items():
                zf.writestr(name, payload)
        contents[target] = buffer.getvalue()
    try:
        load_cooccurrence(
            art / "cooccurrence", expected_vocab_size=None, max_bytes=64 << 20, contents=contents
        )
        event("loaded")
    except DynaMoRuntimeError as exc:
        event(type(exc).__name__)


# -- the ONNX graph -----------------------------------------------------------------------------------

LOCATIONS = ["model.onnx.data", "./model.onnx.data", "../model.onnx.data", "/etc/hostname", "*/_ORT_MEM_ADDR_/*",
             "model.onnx", "", "sub/../model.onnx.data"]  # fmt: skip
DECIMALS = st.sampled_from(["0", "4", "-4", "1e3", "99999999999999999999", "0x10", " 8"]) | st.integers(
    0, 2**40
).map(str)


def _mutate_initializer(model, draw):
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    choice = draw(st.sampled_from(["dims", "dtype", "external", "inline", "location"]))
    if choice == "dims":
        del tensor.dims[:]
        tensor.dims.extend(draw(st.lists(st.integers(0, 2**40) | st.integers(0, 64), max_size=4)))
    elif choice == "dtype":
        tensor.data_type = draw(st.integers(0, 30))
    elif choice == "external":
        del tensor.external_data[:]
        for key in draw(
            st.lists(st.sampled_from(["location", "offset", "length", "checksum", "x"]), max_size=4)
        ):
            value = draw(st.sampled_from(LOCATIONS)) if key == "location" else draw(DECIMALS)
            tensor.external_data.add(key=key, value=value)
    elif choice == "inline":
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
        tensor.raw_data = draw(st.binary(max_size=64))
    else:
        tensor.data_location = draw(st.sampled_from([TensorProto.DEFAULT, TensorProto.EXTERNAL]))


def _mutate_node(model, draw):
    node = draw(st.sampled_from(list(model.graph.node)))
    choice = draw(st.sampled_from(["op", "domain", "input", "attribute"]))
    if choice == "op":
        node.op_type = draw(
            st.sampled_from(["Add", "MatMul", "Gather", "Reshape", "Attention", "Loop", "Zz"])
        )
    elif choice == "domain":
        node.domain = draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "evil.domain"]))
    elif choice == "input" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
            st.sampled_from([*model.graph.node[0].output, "", "missing", model.graph.initializer[0].name])
        )
    else:
        node.attribute.append(
            onnx.helper.make_attribute(
                draw(st.sampled_from(["axis", "perm", "to", "K"])), draw(st.integers(-9, 9))
            )
        )


def _mutate_io(model, draw):
    value = draw(st.sampled_from([*model.graph.input, *model.graph.output]))
    choice = draw(st.sampled_from(["type", "dim", "name"]))
    if choice == "type":
        value.type.tensor_type.elem_type = draw(st.integers(0, 30))
    elif choice == "dim" and value.type.tensor_type.shape.dim:
        dim = value.type.tensor_type.shape.dim[
            draw(st.integers(0, len(value.type.tensor_type.shape.dim) - 1))
        ]
        if draw(st.booleans()):
            dim.dim_value = draw(st.integers(0, 2**31))
        else:
            dim.dim_param = draw(st.sampled_from(["batch", "past_sequence", "x", ""]))
    else:
        value.name = draw(st.sampled_from(["logits", "input_ids", "present.0.key", "renamed"]))


def _mutate_opset(model, draw):
    model.opset_import[0].version = draw(st.integers(1, 30))


def _mutate_harmlessly(model, draw):
    """Metadata only: the graph stays valid, so the example goes on to ONNX Runtime and generation."""
    model.doc_string = draw(st.text(max_size=16))


MUTATIONS = [_mutate_initializer, _mutate_node, _mutate_io, _mutate_opset, _mutate_harmlessly]


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_graph_through_the_whole_loader(art, scratch, data):
    """The real graph with initializers, nodes, I/O and opsets changed structurally, the manifest
    rehashed to match: the checks refuse it, or ONNX Runtime refuses it (a typed error), or it loads
    and its first passes either run or fail typed. External data never leaves the artifact."""
    original_graph = (art / "model.onnx").read_bytes()
    original_manifest = (art / MANIFEST_NAME).read_text()
    model = onnx.load_from_string(original_graph)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        data.draw(st.sampled_from(MUTATIONS), label="mutation")(model, data.draw)
    graph = model.SerializeToString()
    try:
        (scratch / "model.onnx").write_bytes(graph)
        (scratch / MANIFEST_NAME).write_text(_rehashed(original_manifest, "model.onnx", graph))
        _load_and_run(scratch)
    finally:
        (scratch / "model.onnx").write_bytes(original_graph)
        (scratch / MANIFEST_NAME).write_text(original_manifest)


# -- graphs whose outputs lie at run time -------------------------------------------------------------


class LyingSession:
    """An onnxruntime.InferenceSession whose `run` results are rewritten from a given pass on."""

    def __init__(self, real, rewrite, start: int) -> None:
        self.real, self.rewrite, self.start, self.passes = real, rewrite, start, 0

    def run(self, names, feed, run_options=None):
        outputs = self.real.run(names, feed, run_options)
        self.passes += 1
        return self.rewrite(outputs) if self.passes >= self.start else outputs

    def __getattr__(self, name):
        return getattr(self.real, name)


def _reshape(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`array` with `axis` cut or tiled to `size` (0 allowed)."""
    axis %= array.ndim
    if size <= array.shape[axis]:
        return np.take(array, range(size), axis=axis)
    reps = [1] * array.ndim
    reps[axis] = -(-size // max(1, array.shape[axis]))
    return np.take(np.tile(array, reps), range(size), axis=axis) if array.shape[axis] else array


LIE = st.fixed_dictionaries(
    {
        "target": st.sampled_from(["logits", "present", "both"]),
        "kind": st.sampled_from(["axis", "dtype", "values", "rank", "drop", "extra", "scalar"]),
        "axis": st.integers(-4, 3),
        "size": st.integers(0, 9),
        "dtype": st.sampled_from(["float16", "float64", "int64", "bool", "float32"]),
        "value": st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38, -1e38]),
    }
)


def _lie(outputs: list, lie: dict) -> list:
    out = list(outputs)
    indices = {"logits": [0], "present": list(range(1, len(out))), "both": list(range(len(out)))}[
        lie["target"]
    ]
    kind = lie["kind"]
    if kind == "drop":
        return out[: max(0, len(out) - 1)]
    if kind == "extra":
        return [*out, out[0]]
    for i in indices:
        array = out[i]
        if kind == "axis":
            out[i] = _reshape(array, lie["axis"], lie["size"])
        elif kind == "dtype":
            out[i] = array.astype(lie["dtype"])
        elif kind == "values":
            out[i] = np.full_like(array, lie["value"])
        elif kind == "rank":
            out[i] = array.reshape(-1) if lie["size"] % 2 else array[None]
        else:
            out[i] = np.float32(lie["value"])
    return out


@pytest.fixture(scope="module")
def loaded(art) -> DynaMoRuntime:
    return DynaMoRuntime.load(art)


@settings(FUZZ, max_examples=80)
@given(lie=LIE, start=st.integers(1, 4), mode=st.sampled_from(MODES))
def test_fuzz_graph_outputs_that_lie(loaded, lie, start, mode):
    """Outputs cut or tiled along any axis (heads, positions, vocabulary, cache), of another dtype or
    rank, NaN/inf/huge values, one output missing or one too many, from the first pass or a later
    one: GraphError (the contract), SamplingError (values) or another typed error, never a bare one."""
    real = loaded.session.session
    loaded.session.session = LyingSession(real, lambda outputs: _lie(outputs, lie), start)
    try:
        loaded.generate([5, 6, 7], max_new_tokens=6, config=mode, seed=0, time_limit_s=20)
        event("generated")  # a lie that changes nothing the contract holds (float32 to float32)
    except DynaMoRuntimeError as exc:
        event(type(exc).__name__)
    finally:
        loaded.session.session = real
