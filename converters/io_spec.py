"""The exporter's I/O spec: the graph's contract (runtime/contract.py) for one model config.

One spec (optimum's habit) drives everything that must agree about the graph's
inputs and outputs: the dynamic axes given to the exporter, the names those axes
get in the saved graph, the post-export check, the dummy inputs of export and
verification, and the manifest the runtime reads. The names, axes, dtypes and the
cache layout themselves are spelled in runtime/contract.py, which the runtime reads
too; this module adds what needs a model config or the `onnx` package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from converters.errors import ExportError
from runtime.contract import (
    ATTENTION_MASK,
    FLOAT_DTYPES,
    INPUT_IDS,
    LOGITS_TO_KEEP,
    PAST,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQ,
    TensorSpec,
    cache_layer_count,
    graph_io,
    interleaved,
)


@dataclass(frozen=True)
class IOSpec:
    """The graph's inputs and outputs, name -> TensorSpec in the graph's order."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    num_cache_layers: int
    cache_dtype: str  # the past/present tensors'
    logits_dtype: str

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def past_names(self) -> list[str]:
        """Cache inputs in the order the graph takes them: layer 0 key, layer 0 value, layer 1 key, ..."""
        return interleaved(PAST_KEY, PAST_VALUE, self.num_cache_layers)

    def present_names(self) -> list[str]:
        return interleaved(PRESENT_KEY, PRESENT_VALUE, self.num_cache_layers)


def io_spec(config, cache_dtype: str = "float32", logits_dtype: str = "float32") -> IOSpec:
    """The contract for a DynaMoConfig (any object with the same size fields), float tensors stored as
    `cache_dtype` (the cache) and `logits_dtype` (the logits)."""
    for dtype in (cache_dtype, logits_dtype):
        if dtype not in FLOAT_DTYPES:
            raise ExportError(f"float I/O dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    layers = cache_layer_count(config.num_hidden_layers, config.num_token_heads)
    inputs, outputs = graph_io(
        num_cache_layers=layers,
        num_token_heads=config.num_token_heads,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        cache_dtype=cache_dtype,
        logits_dtype=logits_dtype,
    )
    return IOSpec(inputs, outputs, layers, cache_dtype, logits_dtype)


# -- dummy inputs -----------------------------------------------------------------------------------


def dummy_inputs(spec: IOSpec, sizes: dict[str, int], vocab_size: int, rng: np.random.Generator) -> dict:
    """Numpy inputs for every name in `spec`, made by a generator keyed by the input's name.

    No padding: the mask is all ones and positions continue from the past. An
    input name that no generator covers fails loudly instead of getting zeros.
    """
    past, seq = sizes[PAST], sizes[SEQ]
    generators: dict[str, Callable[[TensorSpec], np.ndarray]] = {
        INPUT_IDS: lambda t: rng.integers(0, vocab_size, t.shape(sizes), dtype=np.int64),
        ATTENTION_MASK: lambda t: np.ones(t.shape(sizes), dtype=np.int64),
        POSITION_IDS: lambda t: np.broadcast_to(
            np.arange(past, past + seq, dtype=np.int64), t.shape(sizes)
        ).copy(),
        # every fed position unless `sizes` asks for fewer rows: the last KEPT, in order
        LOGITS_TO_KEEP: lambda t: np.arange(seq - t.shape(sizes)[0], seq, dtype=np.int64),
    }
    for name in spec.past_names():
        generators[name] = lambda t: rng.standard_normal(t.shape(sizes)).astype(t.dtype)
    uncovered = [name for name in spec.inputs if name not in generators]
    if uncovered:
        raise ExportError(
            f"no dummy-input generator for graph inputs {uncovered}; add one in converters/io_spec.py"
        )
    return {name: generators[name](t) for name, t in spec.inputs.items()}


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
        if names != list(expected):
            missing = [name for name in expected if name not in names]
            extra = [name for name in names if name not in expected]
            problems.append(f"{kind}: names differ (missing {missing}, unexpected {extra}, or out of order)")
            continue
        for (name, t), value in zip(expected.items(), found, strict=True):
            problems += _tensor_problems(name, t, value)
    if problems:
        raise ExportError("the exported graph breaks the I/O contract: " + "; ".join(problems))


def _tensor_problems(name: str, t: TensorSpec, value: onnx.ValueInfoProto) -> list[str]:
    tensor_type = value.type.tensor_type
    problems = []
    if tensor_type.elem_type != onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)):
        found = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
        problems.append(f"{name}: dtype {found}, expected {t.dtype}")
    dims = list(tensor_type.shape.dim)
    if len(dims) != len(t.axes):
        return [*problems, f"{name}: rank {len(dims)}, expected {len(t.axes)} {t.axes}"]
    for index, (axis, dim) in enumerate(zip(t.axes, dims, strict=True)):
        found = (
            dim.dim_param
            if dim.HasField("dim_param")
            else (dim.dim_value if dim.HasField("dim_value") else None)
        )
        if found != axis:
            problems.append(f"{name}: axis {index} is {found!r}, expected {axis!r}")
    return problems
