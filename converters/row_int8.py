"""The unembedding of an int4 graph as int8 with one activation scale per row.

Why not MatMulNBits for the unembedding too: ONNX Runtime's 4-bit kernel at
accuracy level 4 pays again for every row of its input. At the Pythia-70M
shape (K 512, N 50304, one thread, benchmarks/bench_int4.py) it takes 1.1 ms
for 1 row, 1.9 ms for 3 and 4.4 ms for 9: the 9 rows of a verify pass that
feeds 3 tokens (3 heads x 3 positions) against the 3 of a 1-token pass made
int4's 3-token pass 1.8x its 1-token pass. MLAS's int8 GEMM (MatMulInteger)
reads its weights once for all rows: 1.7 / 1.9 / 2.6 ms.

Why hand-written and not onnxruntime's `quantize_dynamic`: that quantizes the
activations with one scale per tensor, over every row a pass feeds, so a
position's logits would depend on the drafts fed beside it and `verify` would
no longer reproduce `ar` on the graph. No ORT operator quantizes per row
(DynamicQuantizeLinear is per tensor; MatMulIntegerToFloat's a_scale is per
tensor or per column of A). Here each row gets its own scale from its own
largest magnitude, the integer product is exact, and the rescale is
elementwise: a row's logits are bit-for-bit the same whatever rows pass with it.

    s      = max(|a|) / 127                         per row of A (..., K)
    a_q    = round(a / s) + 128                     uint8, zero point 128
    w_q    = round(w / t), t = max_k |w[k, n]| / 63 int8 per column, |w_q| <= 63
    logits = (a_q - 128) @ w_q * t * s              MatMulInteger, then two Muls

The weights take 7 bits (|w_q| <= 63), as `quantize_dynamic(reduce_range=True)`
does: x86 CPUs without VNNI multiply uint8 x int8 pairs into a saturating
int16 (VPMADDUBSW), and 255 x 127 x 2 overflows it, while 255 x 63 x 2 does not.
Measured on the 50k unembedding, 7-bit weights cost the same time as 8-bit and
raise the relative error from 1.0% to 1.7% (4-bit blocks: 8%).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.errors import ExportError
from runtime.contract import LOGITS

ACTIVATION_LEVELS = 127  # |round(a / s)| <= 127 around the zero point
ACTIVATION_ZERO_POINT = 128
WEIGHT_LEVELS = 63  # 7-bit weights: no int16 saturation in VPMADDUBSW (see the module docstring)
_SHAPE_ONLY = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze")


def unembedding_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The MatMul of a constant weight that makes the graph's logits (through shape-only ops)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    weights = {t.name for t in model.graph.initializer}
    node = producer.get(LOGITS)
    while node is not None and node.op_type in _SHAPE_ONLY:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in weights:
        found = "nothing" if node is None else f"{node.op_type} {node.name!r}"
        raise ExportError(
            f"the graph's {LOGITS!r} come from {found}, not a MatMul of a weight: cannot give the "
            "unembedding its row-wise int8 form; export with --int4-unembedding int4"
        )
    return node


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w_q int8 (K, N) within +-WEIGHT_LEVELS, t float32 (N,)): symmetric, one scale per output column."""
    peak = np.abs(weight).max(axis=0)
    scale = np.where(peak > 0, peak / WEIGHT_LEVELS, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    return quantized, scale


def rewrite_row_int8(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Replace `node` (A (..., K) x constant W (K, N), float32) by the row-wise int8 form, in place."""
    graph = model.graph
    (weight,) = [t for t in graph.initializer if t.name == node.input[1]]
    w = numpy_helper.to_array(weight)
    if w.ndim != 2 or w.dtype != np.float32:
        raise ExportError(
            f"the unembedding weight {weight.name!r} is {w.dtype} {list(w.shape)}, not float32 2-D"
        )
    quantized, scale = quantize_weight(w)
    prefix = f"{node.name or 'unembedding'}_row_int8"

    def name(part: str) -> str:
        return f"{prefix}/{part}"

    constants = {
        "weight": quantized,
        "weight_scale": scale,
        "axis": np.array([-1], dtype=np.int64),
        "tiny": np.array(np.finfo(np.float32).tiny, dtype=np.float32),
        "levels": np.array(ACTIVATION_LEVELS, dtype=np.float32),
        "low": np.array(-ACTIVATION_LEVELS, dtype=np.float32),
        "shift": np.array(ACTIVATION_ZERO_POINT, dtype=np.float32),
        "zero_point": np.array(ACTIVATION_ZERO_POINT, dtype=np.uint8),
    }
    activations, output = node.input[0], node.output[0]
    steps = [
        ("Abs", [activations], "magnitude", {}),
        ("ReduceMax", [name("magnitude"), name("axis")], "peak", {"keepdims": 1}),
        ("Max", [name("peak"), name("tiny")], "nonzero_peak", {}),  # an all-zero row: scale tiny, codes 0
        ("Div", [name("nonzero_peak"), name("levels")], "row_scale", {}),
        ("Div", [activations, name("row_scale")], "scaled", {}),
        ("Round", [name("scaled")], "rounded", {}),
        ("Clip", [name("rounded"), name("low"), name("levels")], "clipped", {}),
        ("Add", [name("clipped"), name("shift")], "shifted", {}),
        ("Cast", [name("shifted")], "codes", {"to": TensorProto.UINT8}),
        ("MatMulInteger", [name("codes"), name("weight"), name("zero_point")], "products", {}),
        ("Cast", [name("products")], "float_products", {"to": TensorProto.FLOAT}),
        ("Mul", [name("float_products"), name("weight_scale")], "column_scaled", {}),
    ]
    nodes = [
        helper.make_node(op, inputs, [name(out)], name=name(op + "_" + out), **attrs)
        for op, inputs, out, attrs in steps
    ]
    nodes.append(
        helper.make_node("Mul", [name("column_scaled"), name("row_scale")], [output], name=name("Mul"))
    )
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(nodes):
        graph.node.insert(at + offset, new)
    if not any(node.input[1] in n.input for n in graph.node):
        graph.initializer.remove(weight)
    graph.initializer.extend(numpy_helper.from_array(value, name(key)) for key, value in constants.items())
