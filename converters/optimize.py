"""Graph rewrites after export: ORT's transformer fusions, fp16 for CUDA, int8 for CPU.

Every function reads an ONNX file and writes another (weights always as
external data, so models over protobuf's 2 GB limit pass through); the caller
decides how the final artifact is laid out.

- `fuse`: onnxruntime.transformers' optimizer with its GPT-NeoX preset fuses
  LayerNorm + residual Add into SkipLayerNormalization and bias + Gelu into
  BiasGelu; it finds no attention fusion for the rotary + cache pattern.
  Measured on CPU (benchmarks/bench_head_cost.py, one thread, median step
  time): base models gain 2-4%, DynaMo-T3 graphs gain nothing at 410M and lose
  7-10% at 70M. With no consistent gain, the exporter leaves it off by default
  (`--optimize` turns it on, e.g. to measure it on CUDA).
- `to_fp16`: weights, cache and compute in float16, logits kept float32. The
  rotary angles (position x inverse frequency, up to 2048 radians) stay
  float32: float16 cannot resolve an angle of 2048 to better than 1 radian.
- `quantize_int8`: onnxruntime's dynamic quantization of the weight MatMuls
  (int8 weights, uint8 activations quantized per call); the attention MatMuls
  of two activations and the rotary path stay float32. One scale per weight
  tensor: per-channel scales lowered the logits' max diff only from 0.085 to
  0.07 on the Pythia-70M architecture and ran slower.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.onnx_model import OnnxModel

from converters.errors import ExportError
from converters.onnx_export import quiet_loggers
from runtime.contract import LOGITS

# ORT's tools log shape-inference doubts ("Unable to determine if past + seq <= past + seq") and advice
# ("consider pre-processing") at WARNING level, through these loggers and the root logger.
_NOISY = ("symbolic_shape_infer", "onnxruntime.transformers", "")

# Values below float16's range become this instead of -inf: the attention mask adds
# float32's minimum, and -inf + -inf rows would softmax to NaN.
FP16_MAX_FINITE = 1e4


def save_onnx(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `path`, with every tensor over 1 KB in `path.name`.data when `external` (protobuf stops at 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def fuse(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Apply ORT's transformer fusions; returns how many of each fused op were made."""
    with quiet_loggers(*_NOISY):
        fused = optimizer.optimize_model(
            str(src), model_type="gpt_neox", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
        )
    stats = {op: count for op, count in fused.get_fused_operator_statistics().items() if count}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fused.save_model_to_file(str(dst), use_external_data_format=True)
    return stats


def rotary_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute the rotary angles and their cos/sin (everything upstream of Cos/Sin)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    trig = [node for node in model.graph.node if node.op_type in ("Cos", "Sin")]
    if not trig:
        raise ExportError(
            "no Cos/Sin nodes in the graph: cannot find the rotary embedding to keep in float32"
        )
    names, stack = set(), list(trig)
    while stack:
        node = stack.pop()
        if node.name in names:
            continue
        names.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    return sorted(names)


def to_fp16(src: Path, dst: Path) -> None:
    """float16 weights, cache inputs/outputs and compute; float32 logits and rotary angles."""
    model = onnx.load(str(src))
    wrapped = OnnxModel(model)
    with quiet_loggers(*_NOISY):
        wrapped.convert_float_to_float16(
            use_symbolic_shape_infer=True,
            keep_io_types=[LOGITS],
            node_block_list=rotary_nodes(model),
            max_finite_val=FP16_MAX_FINITE,
        )
    save_onnx(wrapped.model, dst, external=True)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMuls with a constant weight (CPU)."""
    model = onnx.load(str(src), load_external_data=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet_loggers(*_NOISY):
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=rotary_nodes(model),
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
