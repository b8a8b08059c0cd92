"""Graph rewrites after export: ORT's transformer fusions, fp16 for CUDA, int8 and int4 for CPU.

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
- `quantize_int4`: weight-only 4-bit blocks (onnxruntime's MatMulNBitsQuantizer,
  round-to-nearest min/max per block of `block_size` weights along the input
  axis, one float32 scale and, unless symmetric, one 4-bit zero point per
  block): every MatMul with a constant weight becomes com.microsoft
  MatMulNBits, the shared unembedding too with `--int4-unembedding int4`
  (by default it is row-wise int8, below), and the token embedding's
  Gather becomes GatherBlockQuantized (the embedding is a third of Pythia-70M's
  weights: without it the artifact is 0.44x fp32's, with it 0.16x). The
  attention MatMuls of two activations and the rotary path stay float32.
  Figures below: benchmarks/bench_int4.py (Pythia-70M shape, 50k vocabulary,
  one ORT thread, 128 tokens of past, medians of 60 interleaved runs on this
  2-core machine while another job used a core) and the shipped reference
  model's held-out PPL (32 windows of 256 tokens, --eval-tokens).
  * accuracy_level 4 (int8 activations, per block, against the 4-bit weights),
    chosen on this CPU (AMD EPYC, AVX-512 VNNI): a 1-token pass took 5.4 ms at
    level 4 against 12.7 ms at level 0 (unset: float32 compute) and 12.6 ms at
    level 1, nearly the fp32 graph's 13.8 ms; a 3-token pass 8.4 ms against
    20.9 and 20.3 ms, slower than fp32's 15.5 ms. It costs no accuracy:
    reference PPL_1 63.356 at level 4, 63.357 at level 0 (fp32 63.046).
  * RTN, asymmetric, block 32 by default: 0.16x fp32's size, a 1-token pass
    0.39x fp32's and 0.89x int8's. Reference-model PPL_1 vs fp32: block 32
    +0.49% (symmetric +0.57%), 64 +0.64%, 128 +0.69%; int8 +0.06%. HQQ (block
    32) gave +0.37%, but its float zero points get no accuracy_level (the
    level-0 speed above) and 13% more bytes; k-quant +0.89%: neither pays.
    `--int4-block-size 128` is 18% faster per 1-token pass (4.4 vs 5.4 ms) and
    17% smaller, for +0.2 points of PPL.
  * The unembedding is int8 with one activation scale per row by default
    (converters/row_int8.py, `--int4-unembedding int8`). In 4-bit blocks a
    3-token pass cost 1.71x a 1-token pass (fp32 and int8: 1.20-1.22x): the 4-bit
    int8-compute kernel pays per row of its input, and the 50k unembedding
    takes 1.9 ms for the 3 rows of a 1-token pass (3 heads) and 4.4 ms for the
    9 of a 3-token pass. Row-wise int8 takes 1.9 and 2.7 ms: the 3-token pass
    falls to 1.35x (6.62 vs 4.89 ms; with 4-bit: 8.34 vs 4.87 ms), for 9 MiB
    more (0.19x fp32's size instead of 0.16x) and a more accurate unembedding.
    `--int4-unembedding int4` keeps the smallest artifact and the fastest
    1-token pass. A per-tensor activation scale (onnxruntime's
    quantize_dynamic) would be as fast, but then a position's logits depend
    on the rows fed beside it and verify would no longer reproduce ar; 8-bit
    MatMulNBits keeps rows apart but runs as slowly as 4-bit over 9 rows.
  * The quantizer writes the embedding as a uint4 tensor, which needs ONNX
    opset 21, and raises the default domain's opset to 21 when it is lower.
    Between opsets 18 and 21 the operators of this graph only gained element
    types (int4, float8): their semantics on float32/int64 are unchanged, and
    the parity check runs the rewritten graph. The manifest records 21.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.onnx_model import OnnxModel

from converters.errors import ExportError
from converters.onnx_export import quiet_loggers
from converters.row_int8 import rewrite_row_int8, unembedding_node
from runtime.contract import INT4_BLOCK_SIZES, LOGITS

# ORT's tools log shape-inference doubts ("Unable to determine if past + seq <= past + seq") and advice
# ("consider pre-processing") at WARNING level, through these loggers and the root logger.
_NOISY = ("symbolic_shape_infer", "onnxruntime.transformers", "")
_QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"  # INFO per node, a WARNING on the opset

# Measured on this CPU (see the module docstring): int8 compute against the 4-bit weights, 2.4x faster than
# float32 compute at no measurable cost in perplexity. ORT's other levels: 0 unset, 1 fp32, 2 fp16, 3 bf16.
INT4_ACCURACY_LEVEL = 4
# How an int4 graph stores the unembedding (--int4-unembedding): int8 with a scale per row
# (converters/row_int8.py), for passes that feed several tokens; or 4-bit blocks like the rest.
INT4_UNEMBEDDINGS = ("int8", "int4")

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


@dataclass(frozen=True)
class Int4Config:
    """dynamo-export --dtype int4's settings: weights in blocks of `block_size` along the input axis."""

    block_size: int = 32
    symmetric: bool = False  # True: no zero points (4-bit values in -8..7 times a scale)
    accuracy_level: int = INT4_ACCURACY_LEVEL  # not a CLI option: benchmarks/bench_int4.py compares levels
    unembedding: str = (
        "int8"  # "int8": row-wise int8 (converters/row_int8.py); "int4": MatMulNBits like the rest
    )

    def problems(self) -> list[str]:
        problems = []
        if isinstance(self.block_size, bool) or self.block_size not in INT4_BLOCK_SIZES:
            problems.append(f"--int4-block-size {self.block_size!r} is not one of {list(INT4_BLOCK_SIZES)}")
        if not isinstance(self.symmetric, bool):
            problems.append(f"int4 symmetric must be True or False, got {self.symmetric!r}")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in range(5):
            problems.append(f"int4 accuracy_level {self.accuracy_level!r} is not one of ONNX Runtime's 0..4")
        if self.unembedding not in INT4_UNEMBEDDINGS:
            problems.append(
                f"--int4-unembedding {self.unembedding!r} is not one of {list(INT4_UNEMBEDDINGS)}"
            )
        return problems

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        unembedding = "row-wise int8 (7-bit weights)" if self.unembedding == "int8" else "4-bit"
        return (
            f"MatMulNBits/GatherBlockQuantized 4-bit RTN, block {self.block_size}, {kind}, "
            f"accuracy_level {self.accuracy_level}; unembedding {unembedding}"
        )


def quantize_int4(src: Path, dst: Path, config: Int4Config) -> None:
    """Weight-only 4-bit blocks for every MatMul with a constant weight and the token embedding (CPU);
    the unembedding too with `config.unembedding` "int4", else its row-wise int8 form."""
    matmul_nbits_quantizer = _import_quantizer()
    model = onnx.load(str(src))
    excluded = rotary_nodes(model)
    unembedding = None
    if config.unembedding == "int8":
        unembedding = unembedding_node(model)
        unembedding.name = unembedding.name or "unembedding"  # the quantizer excludes nodes by name
        excluded.append(unembedding.name)
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        nodes_to_exclude=excluded,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),  # MatMul B is (K, N); the embedding (V, H): blocks along H
    )
    with quiet_loggers(*_NOISY, _QUANTIZER_LOGGER):
        quantizer.process()
    quantized = quantizer.model.model
    if unembedding is not None:
        rewrite_row_int8(quantized, unembedding_node(quantized))
    left = _unquantized_weights(quantized)
    if left:
        raise ExportError(
            f"the int4 quantizer left weight nodes in float32: {left[:5]}; this model's graph has a weight "
            "layout the quantizer does not handle, export --dtype int8 instead"
        )
    save_onnx(quantized, dst, external=True)


def _import_quantizer():
    """onnxruntime's quantizer module calls logging.basicConfig(level=INFO) on import: keep the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return matmul_nbits_quantizer


def _unquantized_weights(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm/Gather nodes that still read a float weight (the quantizer skips some shapes silently)."""
    floats = {
        t.name
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    weights = {"MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,)}  # the inputs that hold a weight
    return [
        node.name or node.op_type
        for node in model.graph.node
        if any(i < len(node.input) and node.input[i] in floats for i in weights.get(node.op_type, ()))
    ]
