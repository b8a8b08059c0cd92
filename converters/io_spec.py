"""The graph's I/O contract, written once.

One spec (optimum's habit) drives everything that must agree about the graph's
inputs and outputs: the dynamic axes given to the exporter, the names those axes
get in the saved graph, the post-export check, the dummy inputs of export and
verification, and the manifest the runtime reads.

    input_ids                    int64  (batch, seq)
    attention_mask               int64  (batch, past + seq)
    position_ids                 int64  (batch, seq)
    past_key_values.{i}.key      float  (batch, num_heads, past, head_dim)   i = 0 .. num_cache_layers-1
    past_key_values.{i}.value    float  (batch, num_heads, past, head_dim)
    ->
    logits                       float  (batch, n_heads, seq, vocab)
    present.{i}.key / .value     float  (batch, num_heads, past + seq, head_dim)

Cache layers are ordered stem 0..L-2, head 1's layer, then the extra heads' layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from dynamo_export.errors import ExportError
from runtime.manifest import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, TensorSpec

BATCH = "batch"
SEQ = "seq"
PAST = "past"
TOTAL = "past + seq"  # optimum spells the sum out too; the attention mask and the presents have this length

CACHE_DTYPES = ("float32", "float16")
_ONNX_DTYPES = {
    "int64": onnx.TensorProto.INT64,
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
}
_NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: dtype is an ONNX-style name; axes hold a named dynamic axis or a fixed size."""

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the axis sizes in `sizes` ({'batch': 2, 'seq': 3, 'past': 5}; TOTAL derived)."""
        sizes = {**sizes, TOTAL: sizes[PAST] + sizes[SEQ]}
        return tuple(a if isinstance(a, int) else sizes[a] for a in self.axes)


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    num_cache_layers: int

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def cache_dtype(self) -> str:
        return self.inputs[-1].dtype

    @property
    def logits_dtype(self) -> str:
        return self.outputs[0].dtype

    def past_names(self) -> list[str]:
        """Cache inputs in the order the graph takes them: layer 0 key, layer 0 value, layer 1 key, ..."""
        return [
            n for i in range(self.num_cache_layers) for n in (PAST_KEY.format(i=i), PAST_VALUE.format(i=i))
        ]

    def present_names(self) -> list[str]:
        return [
            n
            for i in range(self.num_cache_layers)
            for n in (PRESENT_KEY.format(i=i), PRESENT_VALUE.format(i=i))
        ]

    def with_dtypes(self, cache_dtype: str, logits_dtype: str) -> IOSpec:
        """The same contract with float tensors stored as `cache_dtype` (cache) and `logits_dtype` (logits)."""
        for dtype in (cache_dtype, logits_dtype):
            if dtype not in CACHE_DTYPES:
                raise ExportError(f"float I/O dtype must be one of {CACHE_DTYPES}, got {dtype!r}")

        def retype(t: TensorIO) -> TensorIO:
            if t.dtype == "int64":
                return t
            return replace(t, dtype=logits_dtype if t.name == "logits" else cache_dtype)

        return replace(self, inputs=tuple(map(retype, self.inputs)), outputs=tuple(map(retype, self.outputs)))

    def to_manifest(self) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        def specs(items):
            return {t.name: TensorSpec(dtype=t.dtype, axes=list(t.axes)) for t in items}

        return specs(self.inputs), specs(self.outputs)


def io_spec(config, cache_dtype: str = "float32", logits_dtype: str = "float32") -> IOSpec:
    """The contract for a DynaMoConfig (any object with the same size fields)."""
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    num_cache = config.num_hidden_layers + config.num_token_heads - 1
    cache_in = (BATCH, heads, PAST, head_dim)
    cache_out = (BATCH, heads, TOTAL, head_dim)
    inputs = [
        TensorIO("input_ids", "int64", (BATCH, SEQ)),
        TensorIO("attention_mask", "int64", (BATCH, TOTAL)),
        TensorIO("position_ids", "int64", (BATCH, SEQ)),
    ]
    outputs = [TensorIO("logits", "float32", (BATCH, config.num_token_heads, SEQ, config.vocab_size))]
    for i in range(num_cache):
        inputs += [
            TensorIO(PAST_KEY.format(i=i), "float32", cache_in),
            TensorIO(PAST_VALUE.format(i=i), "float32", cache_in),
        ]
        outputs += [
            TensorIO(PRESENT_KEY.format(i=i), "float32", cache_out),
            TensorIO(PRESENT_VALUE.format(i=i), "float32", cache_out),
        ]
    spec = IOSpec(inputs=tuple(inputs), outputs=tuple(outputs), num_cache_layers=num_cache)
    return spec.with_dtypes(cache_dtype, logits_dtype)


# -- dummy inputs -----------------------------------------------------------------------------------


def dummy_inputs(spec: IOSpec, sizes: dict[str, int], vocab_size: int, rng: np.random.Generator) -> dict:
    """Numpy inputs for every name in `spec`, made by a generator keyed by the input's name.

    No padding: the mask is all ones and positions continue from the past. An
    input name that no generator covers fails loudly instead of getting zeros.
    """
    past, seq = sizes[PAST], sizes[SEQ]
    generators: dict[str, Callable[[TensorIO], np.ndarray]] = {
        "input_ids": lambda t: rng.integers(0, vocab_size, t.shape(sizes), dtype=np.int64),
        "attention_mask": lambda t: np.ones(t.shape(sizes), dtype=np.int64),
        "position_ids": lambda t: np.broadcast_to(
            np.arange(past, past + seq, dtype=np.int64), t.shape(sizes)
        ).copy(),
    }
    for name in spec.past_names():
        generators[name] = lambda t: rng.standard_normal(t.shape(sizes)).astype(_NUMPY_DTYPES[t.dtype])
    uncovered = [t.name for t in spec.inputs if t.name not in generators]
    if uncovered:
        raise ExportError(
            f"no dummy-input generator for graph inputs {uncovered}; add one in converters/io_spec.py"
        )
    return {t.name: generators[t.name](t) for t in spec.inputs}


# -- the post-export check --------------------------------------------------------------------------


def check_graph_io(model: onnx.ModelProto, spec: IOSpec) -> None:
    """Raise one ExportError listing every way the graph's inputs/outputs differ from `spec`.

    Checked in order: names (and their order), then per tensor the element type,
    the rank, and each axis (named dynamic axis <-> dim_param, fixed size <-> dim_value).
    """
    problems = []
    for kind, expected, found in (
        ("inputs", spec.inputs, list(model.graph.input)),
        ("outputs", spec.outputs, list(model.graph.output)),
    ):
        names = [v.name for v in found]
        if names != [t.name for t in expected]:
            missing = [t.name for t in expected if t.name not in names]
            extra = [n for n in names if n not in {t.name for t in expected}]
            problems.append(f"{kind}: names differ (missing {missing}, unexpected {extra}, or out of order)")
            continue
        for t, value in zip(expected, found, strict=True):
            problems += _tensor_problems(t, value)
    if problems:
        raise ExportError("the exported graph breaks the I/O contract: " + "; ".join(problems))


def _tensor_problems(t: TensorIO, value: onnx.ValueInfoProto) -> list[str]:
    tensor_type = value.type.tensor_type
    problems = []
    if tensor_type.elem_type != _ONNX_DTYPES[t.dtype]:
        found = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
        problems.append(f"{t.name}: dtype {found}, expected {t.dtype}")
    dims = list(tensor_type.shape.dim)
    if len(dims) != len(t.axes):
        return [*problems, f"{t.name}: rank {len(dims)}, expected {len(t.axes)} {t.axes}"]
    for index, (axis, dim) in enumerate(zip(t.axes, dims, strict=True)):
        found = (
            dim.dim_param
            if dim.HasField("dim_param")
            else (dim.dim_value if dim.HasField("dim_value") else None)
        )
        if found != axis:
            problems.append(f"{t.name}: axis {index} is {found!r}, expected {axis!r}")
    return problems
