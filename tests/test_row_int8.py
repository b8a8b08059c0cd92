"""converters/row_int8.py: an int4 graph's unembedding as int8 with one activation scale per row.

Checked on a one-MatMul graph against numpy: the logits equal a brute-force
integer computation of the documented scheme and stay near the float32 product;
a row's logits are bit-for-bit the same whatever rows are fed beside it (what
keeps `verify` exactly `ar` on an int4 graph); an all-zero row gives zeros.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.errors import ExportError
from converters.row_int8 import rewrite_row_int8, unembedding_node
from runtime.contract import LOGITS

K, N = 64, 300


def graph(weight: np.ndarray, last_op: str = "MatMul") -> onnx.ModelProto:
    """hidden (batch, heads, rows, K) -> MatMul(weight) [-> Reshape] -> logits, like the exported graph's end."""
    nodes = [helper.make_node("MatMul", ["hidden", "embed_out"], ["product"], name="unembed")]
    if last_op == "MatMul":
        nodes[0].output[0] = LOGITS
    else:
        nodes.append(helper.make_node(last_op, ["product"], [LOGITS], name="last"))
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "h", "r", K])],
            [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["b", "h", "r", N])],
            [numpy_helper.from_array(weight, "embed_out")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    return model


def brute_force(hidden: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The scheme of the module docstring, in float64 and Python-sized integers, one row at a time."""
    peak = np.abs(weight).max(axis=0).astype(np.float64)
    t = np.where(peak > 0, peak / 63, 1.0)  # a zero column: any scale, its codes are 0
    w_q = np.clip(np.rint(weight / t.astype(np.float32)), -63, 63).astype(np.int64)
    rows = hidden.reshape(-1, K)
    out = np.empty((rows.shape[0], N))
    for i, row in enumerate(rows):
        s = np.float32(max(np.abs(row).max(), np.finfo(np.float32).tiny)) / np.float32(127)
        codes = np.clip(np.rint(row / s), -127, 127).astype(np.int64)
        out[i] = (codes @ w_q) * t * s
    return out.reshape(*hidden.shape[:-1], N)


@pytest.fixture(scope="module")
def weight():
    w = np.random.default_rng(1).normal(0, 0.05, (K, N)).astype(np.float32)
    w[:, 7] = 0  # a column of zeros: scale 1, codes 0
    return w


def rewritten(weight: np.ndarray, last_op: str = "MatMul") -> ort.InferenceSession:
    model = graph(weight, last_op)
    rewrite_row_int8(model, unembedding_node(model))
    onnx.checker.check_model(model)
    assert not any(t.name == "embed_out" for t in model.graph.initializer), "the float table stays"
    (table,) = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert table.shape == (K, N) and np.abs(table).max() == 63
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("last_op", ["MatMul", "Identity"])
def test_the_logits_are_the_documented_integer_scheme(weight, last_op):
    hidden = np.random.default_rng(2).normal(0, 1, (2, 3, 4, K)).astype(np.float32)
    hidden[1, 2, 3] = 0  # an all-zero row
    (logits,) = rewritten(weight, last_op).run(None, {"hidden": hidden})
    np.testing.assert_allclose(logits, brute_force(hidden, weight), rtol=1e-5, atol=1e-6)
    assert not logits[1, 2, 3].any()
    exact = hidden.astype(np.float64) @ weight
    assert np.abs(logits - exact).max() < 0.03 * np.abs(exact).max()  # 7-bit weights, 8-bit rows
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() > 0.9


def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(weight):
    session = rewritten(weight)
    rng = np.random.default_rng(3)
    hidden = rng.normal(0, 1, (1, 3, 3, K)).astype(np.float32)
    hidden[0, 1, 2] *= 100  # a row far larger than the rest: a per-tensor scale would crush the others
    (together,) = session.run(None, {"hidden": hidden})
    for h in range(3):
        for r in range(3):
            (alone,) = session.run(None, {"hidden": hidden[:, h : h + 1, r : r + 1]})
            assert np.array_equal(alone[0, 0, 0], together[0, h, r])


def test_logits_that_no_weight_matmul_makes_are_refused(weight):
    model = graph(weight, "Relu")
    with pytest.raises(
        ExportError, match=r"come from Relu 'last', not a MatMul of a weight.*--int4-unembedding int4"
    ):
        unembedding_node(model)
