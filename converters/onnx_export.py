"""PyTorch -> ONNX: one graph with a KV cache that returns every head's logits.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript).
In torch 2.13 it is the default and maintained path. The TorchScript exporter
(`dynamo=False`) still works but emits a DeprecationWarning and a TracerWarning
from transformers' SDPA code, and its graph of the tiny test model has 900 nodes
against 352; once ONNX Runtime has optimised either graph, step times on the
Pythia-70M architecture were the same within noise. The price of the dynamo
exporter is export time (10-15 s for the 3-layer test model against 1 s,
17 s for Pythia-70M, 60-120 s for Pythia-410M on a busy 2-core machine) and
opaque axis symbols (s22, s2 + s70), which `name_axes` replaces with the spec's
names. The model keeps its default SDPA attention: 'eager' exported to a graph
of 307 nodes that ran no faster.

Dynamic axes are declared as `Dim.DYNAMIC` rather than named `Dim`s because the
attention mask's length is past + seq and `Dim`s cannot be added together;
torch.export derives that relation itself (present length = past + seq) and
raises if an axis would be specialised. The example inputs use distinct sizes
(batch 2, seq 3, past 5): equal example sizes would be merged into one symbol
and a size of 0 or 1 would be specialised. past = 0 (prefill) is the same graph
with an empty cache, which `converters.verify` checks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from converters.errors import ExportError
from converters.io_spec import IOSpec, dummy_inputs
from runtime.contract import BATCH, KEPT, PAST, SEQ, TOKEN_INPUTS

EXAMPLE_SIZES = {BATCH: 2, SEQ: 3, PAST: 5, KEPT: 2}  # kept != seq: the exporter must not tie them
_SYMBOL = re.compile(r"\b[a-z]\d+\b")


class FlatCacheModel(nn.Module):
    """The DynaMo model with the graph's flat signature: tensors in, tensors out, no Python containers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
        past_key_values = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        presents = [t for key_value in out.past_key_values for t in key_value]
        return (out.logits, *presents)


def export_onnx(model: nn.Module, path: Path, spec: IOSpec, opset: int) -> Path:
    """Export `model` to `path` (+ `path.name`.data) in fp32, with the graph's axes named as in `spec`."""
    model = model.eval().float()
    rng = np.random.default_rng(0)
    feeds = dummy_inputs(spec, EXAMPLE_SIZES, model.config.vocab_size, rng)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    dynamic = {
        name: {i: torch.export.Dim.DYNAMIC for i, axis in enumerate(t.axes) if isinstance(axis, str)}
        for name, t in spec.inputs.items()
    }
    # Keyed by FlatCacheModel.forward's parameters, which carry the token inputs' names and *past.
    shapes = {
        **{name: dynamic[name] for name in TOKEN_INPUTS},
        "past": tuple(dynamic[name] for name in spec.past_names()),
    }
    with torch.no_grad(), warnings.catch_warnings(), quiet_loggers("torch.onnx"):
        # The exporter warns about its own internals (missing torchvision ops, deprecations); none concern us.
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                FlatCacheModel(model),
                args,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=shapes,
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many unrelated types; all mean the same to the caller
            raise ExportError(f"torch.onnx.export failed for opset {opset}: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)

    graph = onnx.load(str(path), load_external_data=False)
    produced = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    if produced != opset:
        raise ExportError(
            f"the exporter could not convert the graph to opset {opset} (it produced opset {produced}); "
            f"use the default --opset"
        )
    name_axes(graph, spec)
    strip_debug_metadata(graph)
    onnx.save_model(graph, str(path))  # the weights stay in path.name + ".data", which the tensors reference
    return path


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Raise these loggers to ERROR for a while: the exporter and ORT's tools warn about their own internals."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def name_axes(model: onnx.ModelProto, spec: IOSpec) -> None:
    """Replace the exporter's axis symbols with the spec's names, in every shape of the graph.

    The graph inputs define the mapping (symbol -> name); outputs and inner
    shapes are rewritten token by token, so "s2 + s70" becomes "past + seq".
    A symbol the spec names twice, or a spec axis the exporter made static, is an error.
    """
    mapping: dict[str, str] = {}
    problems = []
    found = {v.name: v for v in model.graph.input}
    for name, t in spec.inputs.items():
        if name not in found:
            problems.append(f"input {name} is missing from the exported graph")
            continue
        for index, (axis, dim) in enumerate(
            zip(t.axes, found[name].type.tensor_type.shape.dim, strict=False)
        ):
            if not isinstance(axis, str):
                continue
            if not dim.HasField("dim_param"):
                problems.append(
                    f"{name} axis {index} ({axis!r}) was exported as the fixed size {dim.dim_value}"
                )
            elif mapping.setdefault(dim.dim_param, axis) != axis:
                problems.append(
                    f"symbol {dim.dim_param} stands for both {mapping[dim.dim_param]!r} and {axis!r}"
                )
    if problems:
        raise ExportError("the exporter did not keep the dynamic axes: " + "; ".join(problems))

    def rename(value: onnx.ValueInfoProto) -> None:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                named = _SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), dim.dim_param)
                terms = named.split(" + ")
                if all(term.isidentifier() for term in terms):
                    # Sums come out in either order ("seq + past"); sorted terms give the spec's "past + seq".
                    named = " + ".join(sorted(terms))
                dim.dim_param = named

    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        rename(value)


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (FX node dumps, stack traces with source paths).

    They make up most of a small graph's bytes and describe the exporting
    machine, not the model; an artifact ships to other people's devices.
    """
    for item in [*model.graph.node, *model.graph.value_info, *model.graph.initializer]:
        del item.metadata_props[:]


def embed_out_readers(
    model: onnx.ModelProto, weight: np.ndarray, base_dir: Path
) -> tuple[list[str], list[onnx.NodeProto]]:
    """Initializers holding embed_out's weight (as stored or transposed) and the nodes that read them.

    The heads share embed_out, so a graph that keeps the shared projection has
    exactly one such initializer read by exactly one MatMul/Gemm. Only tensors of
    the right shape are read from `base_dir`'s external data.
    """
    names = []
    for init in model.graph.initializer:
        if tuple(init.dims) not in (weight.shape, weight.T.shape):
            continue
        array = numpy_helper.to_array(init, base_dir=str(base_dir))
        if array.dtype == weight.dtype and any(
            array.shape == w.shape and np.array_equal(array, w) for w in (weight, weight.T)
        ):
            names.append(init.name)
    readers = [node for node in model.graph.node if set(node.input) & set(names)]
    return names, readers


def check_shared_projection(path: Path, weight: np.ndarray) -> None:
    """Fail unless one MatMul/Gemm applies embed_out to all heads at once (the cost of extra heads)."""
    model = onnx.load(str(path), load_external_data=False)
    names, readers = embed_out_readers(model, weight, path.parent)
    kinds = [node.op_type for node in readers]
    if len(names) != 1 or kinds not in (["MatMul"], ["Gemm"]):
        raise ExportError(
            f"expected embed_out's weight once, read by one MatMul/Gemm, found {len(names)} copies read by "
            f"{kinds}: the heads must share one projection of their stacked states (DynaMoForCausalLM.forward)"
        )
