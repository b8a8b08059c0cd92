"""The marginals' own exp and normaliser (runtime/marginals.py) against independent definitions:
math.exp, exact sums, and the plain reference's softmax. The compiled twin is held to these same
bits in tests/test_native.py."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from runtime import marginals
from tests import oracle

ULP = 2.0**-52


def test_exp_is_within_about_one_ulp_of_math_exp():
    rng = np.random.default_rng(0)
    z = np.concatenate(
        [rng.uniform(-707.9, 0, 20_000), rng.uniform(-40, 0, 20_000), -rng.exponential(1e-3, 2000)]
    )
    expected = np.array([math.exp(v) for v in z])
    relative = np.abs(marginals.exp(z) - expected) / expected
    assert relative.max() <= 1.5 * ULP


def test_exp_edges():
    z = np.array(
        [0.0, -0.0, marginals.EXP_FLOOR, np.nextafter(marginals.EXP_FLOOR, -np.inf), -745.2, -np.inf]
    )
    out = marginals.exp(z)
    assert out[0] == out[1] == 1.0  # the largest logit weighs exactly 1
    assert math.isclose(out[2], math.exp(-708.0), rel_tol=2 * ULP)
    assert out[3:].tolist() == [0.0, 0.0, 0.0]  # below the floor: nothing a float64 sum could hold


def test_exp_rounds_half_integers_of_log2e_to_even():
    """n = round(z log2 e) ties to even, as the shifter does in C; results stay continuous across n."""
    z = -np.arange(1, 60) * math.log(2) / 2  # z log2 e lands on (or next to) half integers
    expected = np.array([math.exp(v) for v in z])
    assert (np.abs(marginals.exp(z) - expected) / expected).max() <= 1.5 * ULP


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 8192, 50_304])
def test_lane_totals_are_sixteen_running_sums_then_the_lanes_in_order(vocab):
    rng = np.random.default_rng(vocab)
    weights = rng.random((2, vocab)) ** 8
    for row, total in zip(weights, marginals.lane_totals(weights), strict=True):
        lanes = [0.0] * marginals.LANES
        for i, w in enumerate(row.tolist()):
            lanes[i % marginals.LANES] += w
        expected = 0.0
        for lane in lanes:
            expected += lane
        assert total == expected
        exact = sum(Fraction(w) for w in row.tolist())
        assert abs(Fraction(total) - exact) <= exact * vocab * ULP  # and a sum within rounding


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 2.5])
def test_topk_probabilities_match_the_reference_softmax(temperature):
    """runtime/oracle.py: math.exp and math.fsum over the vocabulary, ranked by (-logit, id)."""
    rng = np.random.default_rng(int(temperature * 100))
    logits = (rng.normal(size=(3, 3000)) * 4).astype(np.float32)
    logits[1, ::5] = logits[1, 0]  # ties
    for use_native in (True, False):
        ids, probs = marginals.topk_arrays(logits, 40, temperature, use_native)
        for row, row_ids, row_probs in zip(logits, ids, probs, strict=True):
            expected = oracle.candidates(row, 40, temperature)
            assert row_ids.tolist() == [t for t, _ in expected]
            np.testing.assert_allclose(row_probs, [p for _, p in expected], rtol=1e-13, atol=1e-300)
