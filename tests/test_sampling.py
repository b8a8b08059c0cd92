"""The fast sampler (runtime/sampling.py) against the plain reference (runtime/oracle.py) and
against the properties Algorithm 1 promises: normalised joint, eps_b = 1 is `ar`, eps_b = 0 always
emits n, back-off, greedy, repetition penalty, verify mode's exact target distribution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.ndimage import correlate1d

from runtime.config import SamplingConfig
from runtime.draws import sample_ar
from runtime.dynamic import DynamicSampler
from runtime.errors import SamplingConfigError, SamplingError
from runtime.marginals import head_topk
from runtime.otsu import blur3_twice
from runtime.verify import ar_distribution
from tests import oracle
from tests.sampling_definitions import DenseMasks, FakeModel, csr_masks, outer, random_masks, whole_grid_joint

PLAIN = SamplingConfig(temperature=1.0, repetition_penalty=1.0, adaptive=False, blur=0)


# --- fast == reference ------------------------------------------------------------------------


@st.composite
def steps(draw):
    n_heads = draw(st.sampled_from([1, 2, 3, 3]))
    vocab = draw(st.integers(2, 24))
    adaptive = draw(st.booleans())
    config = SamplingConfig(
        eps_b=draw(st.one_of(st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))),
        top_k=draw(st.integers(1, min(vocab, 6))),
        temperature=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.5])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.1, 3.0])),
        alpha_c=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        adaptive=adaptive,
        blur=draw(st.sampled_from([0, 1, 3, 5])) if adaptive else 0,
        static_threshold=draw(st.sampled_from([0.0, 1e-3, 0.02])),
    )
    # Values come from a seeded generator: continuous, so no two implementations' rounding can
    # straddle an exact tie (ties get their own tests below).
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.3, 2.0, 8.0, 40.0]))
    logits = (rng.normal(size=(n_heads, vocab)) * scale).astype(np.float32)
    density = draw(st.sampled_from([None, 0.0, 0.3, 0.8, 1.0]))
    masks = None if density is None else random_masks(rng, vocab, density)
    generated = rng.integers(0, vocab, size=int(rng.integers(0, 6)))
    return logits, generated, masks, config, int(rng.integers(2**32))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_fast_step_equals_reference(case):
    logits, generated, masks, config, seed = case
    fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    sampler = DynamicSampler()

    fast = sampler.step(logits, generated, masks, config, fast_rng)
    ties: list[str] = []
    tokens, backoffs = oracle.step(logits, generated, masks, config, ref_rng, ties)
    for n in range(2, logits.shape[0] + 1):
        heads = [oracle.candidates(row, config.top_k, config.temperature or 1.0) for row in logits[:n]]
        oracle.grid_joint(heads, generated, masks, config, ties)
    # A decision exactly on a boundary is a coin toss between two roundings (see oracle.py).
    assume(not ties)

    assert (fast.tokens, fast.backoffs) == (tokens, backoffs)
    assert fast_rng.bit_generator.state == ref_rng.bit_generator.state  # same draws consumed
    temperature = config.temperature or 1.0
    for n in range(2, logits.shape[0] + 1):  # the same joint at every level
        topks = [head_topk(row, config.top_k, temperature) for row in logits[:n]]
        heads = [oracle.candidates(row, config.top_k, temperature) for row in logits[:n]]
        assert [t.ids.tolist() for t in topks] == [[tok for tok, _ in h] for h in heads]
        grid = sampler.joint(topks, np.asarray(generated), masks, config)
        expected = oracle.grid_joint(heads, generated, masks, config)
        np.testing.assert_allclose(
            [grid[c] for c in expected], list(expected.values()), rtol=1e-9, atol=1e-300
        )


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 2000),
    st.integers(1, 8),
    st.sampled_from(["ties", "continuous", "neg_inf"]),
    st.integers(0, 2**32 - 1),
)
def test_topk_matches_reference_including_ties(vocab, top_k, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        row = rng.normal(size=vocab)
    else:
        row = rng.integers(-2, 3, size=vocab).astype(float)  # many equal logits
        if kind == "neg_inf":
            row[rng.random(vocab) < 0.5] = -np.inf
            row[rng.integers(vocab)] = 1.0
    row = row.astype(np.float32)
    top = head_topk(row, top_k, 0.7)
    expected = oracle.candidates(row, top_k, 0.7)
    assert top.ids.tolist() == [t for t, _ in expected]  # ties go to the smallest ids
    np.testing.assert_allclose(top.probs, [p for _, p in expected], rtol=1e-12)


# --- full-size grids against the whole-grid definition --------------------------------------
# The reference is too slow for the paper's 50**3 grids, where the sampler's shortcuts (early
# back-off, the [1, 2, 1] blur by slices, Otsu binning only the cells that can leave bin 0, a
# sparse tail) matter most. These tests hold it to the same definition written as plain
# whole-grid numpy and scipy, bit for bit.


@pytest.mark.parametrize("shape", [(50, 50, 50), (7, 1, 5), (2, 3, 2), (1, 1, 1), (2,), (9,), (3, 4)])
def test_blur_by_slices_is_twice_scipys_bit_for_bit(shape):
    """Otsu's bins are affine in the values, so only a power-of-2 factor may separate the two."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for _ in range(5):
        grid = rng.random(shape) ** rng.uniform(1, 40)  # values over many orders of magnitude
        grid[rng.random(shape) < 0.4] = 0.0  # masked cells
        expected = grid
        for axis in range(grid.ndim):
            expected = correlate1d(expected, np.array([0.25, 0.5, 0.25]), axis=axis, mode="mirror")
        src = grid
        for axis in range(grid.ndim):
            out = np.empty_like(grid)
            blur3_twice(src, out, axis)
            src = out
        np.testing.assert_array_equal(src, expected * 2.0**grid.ndim)


FULL_SIZE = [
    SamplingConfig(),  # the paper's defaults
    SamplingConfig(blur=0),
    SamplingConfig(blur=5, repetition_penalty=3.0),
    SamplingConfig(alpha_c=0.5, static_threshold=1e-6),
    SamplingConfig(adaptive=False, blur=0, alpha_c=2.0),
    SamplingConfig(alpha_c=0.0, temperature=1.3),
]


@pytest.mark.parametrize("config", FULL_SIZE, ids=lambda c: f"blur{c.blur}-alpha{c.alpha_c}-ad{c.adaptive}")
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked marginals
def test_full_size_joint_equals_the_whole_grid_definition(config, scale):
    rng = np.random.default_rng(int(scale * 10) + config.blur)
    vocab = 64
    masks = random_masks(rng, vocab, 0.3)
    logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
    generated = rng.integers(0, vocab, size=40)
    sampler = DynamicSampler()
    for top_k in (50, 7):
        topks = [head_topk(row, top_k, config.temperature or 1.0) for row in logits]
        for n in (3, 2):
            expected = whole_grid_joint(topks[:n], generated, masks, config)
            np.testing.assert_array_equal(sampler.joint(topks[:n], generated, masks, config), expected)
            np.testing.assert_array_equal(
                sampler.joint(topks[:n], generated, None, config),
                whole_grid_joint(topks[:n], generated, None, config),
            )


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("eps_b", [0.0, 0.05, 0.3, 0.6, 0.95])
def test_full_size_steps_follow_the_whole_grid_definition(eps_b, temperature):
    """Decisions (every early back-off included), the drawn cells and the random numbers used
    match J computed on every cell and drawn by the reference's running sum."""
    rng = np.random.default_rng(int(eps_b * 100))
    vocab = 64
    config = SamplingConfig(eps_b=eps_b, temperature=temperature)
    sampler = DynamicSampler()
    emitted = set()
    for step in range(6):
        masks = random_masks(rng, vocab, 0.3) if step % 2 else None
        logits = (rng.normal(size=(3, vocab)) * rng.choice([0.5, 3.0, 12.0])).astype(np.float32)
        generated = rng.integers(0, vocab, size=20)
        topks = [head_topk(row, config.top_k, config.temperature or 1.0) for row in logits]
        seed = int(rng.integers(2**32))
        expected_rng = np.random.default_rng(seed)
        for n in (3, 2):
            grid = whole_grid_joint(topks[:n], generated, masks, config)
            if min(grid.max(), 1.0) > eps_b ** (n - 1):
                cell = oracle.draw(list(np.ndenumerate(grid)), config.greedy, expected_rng)
                expected = tuple(int(t.ids[i]) for t, i in zip(topks[:n], cell, strict=True))
                break
        else:
            expected = (oracle.sample_ar(logits[0], generated, config, expected_rng),)
        fast_rng = np.random.default_rng(seed)
        result = sampler.step(logits, generated, masks, config, fast_rng)
        assert result.tokens == expected
        assert fast_rng.bit_generator.state == expected_rng.bit_generator.state
        emitted.add(len(result.tokens))
    if eps_b in (0.3, 0.6):
        assert len(emitted) > 1, "the cases should both emit and back off"


def test_weights_can_lift_a_cell_above_the_unweighted_bound():
    """The early back-off must not use the product of marginals once weights move the mass."""
    vocab = 40
    logits = np.zeros((2, vocab), dtype=np.float32)  # flat heads: every product cell is 1 / vocab**2
    pair = np.zeros((vocab, vocab))
    pair[3, 5] = 1.0  # one seen pair takes the grid's whole mass
    config = SamplingConfig(top_k=vocab, eps_b=0.5, adaptive=False, blur=0, repetition_penalty=1.0)
    result = DynamicSampler().step(logits, [], DenseMasks(pair), config, np.random.default_rng(0))
    assert result.tokens == (3, 5) and result.backoffs == 0
    plain = DynamicSampler().step(logits, [], None, config, np.random.default_rng(0))
    assert plain.backoffs == 1


# --- the joint ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3), st.floats(0.25, 3.0), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_weighted_joint_keeps_the_grid_mass(n, alpha_c, density, seed):
    rng = np.random.default_rng(seed)
    vocab, config = 40, PLAIN.replace(top_k=7, alpha_c=alpha_c)
    masks = random_masks(rng, vocab, density)
    topks = [head_topk(row, config.top_k, 1.0) for row in rng.normal(size=(n, vocab)).astype(np.float32)]
    product = outer([t.probs for t in topks])
    weights = masks.weights([t.ids for t in topks]).astype(np.float64)

    grid = DynamicSampler().joint(topks, np.array([], dtype=np.int64), masks, config).copy()

    if not weights.any():  # every candidate n-gram unseen: nothing to redistribute
        assert not grid.any()
        return
    assert math.isclose(grid.sum(), product.sum(), rel_tol=1e-12)  # mass kept, not created
    assert grid.sum() <= 1.0
    seen = weights > 0
    ratio = grid[seen] / (product[seen] * weights[seen] ** alpha_c)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)  # one common factor
    assert not grid[~seen].any()


def test_without_masks_the_joint_is_the_product_of_marginals():
    rng = np.random.default_rng(0)
    topks = [head_topk(row, 5, 1.0) for row in rng.normal(size=(3, 30)).astype(np.float32)]
    pairs_only = DenseMasks(rng.random((30, 30)))  # no triples: the 3-head grid stays unweighted
    for masks, alpha_c in [(None, 1.0), (random_masks(rng, 30, 0.5), 0.0), (pairs_only, 1.0)]:
        grid = DynamicSampler().joint(topks, np.array([1]), masks, PLAIN.replace(alpha_c=alpha_c))
        expected = outer([t.probs for t in topks])
        np.testing.assert_array_equal(grid, expected)


def test_otsu_zeroes_the_low_class_and_keeps_the_peak():
    rng = np.random.default_rng(1)
    row = np.zeros(50, dtype=np.float32)
    row[:3] = [6.0, 5.5, 5.0]  # three likely tokens, a long flat tail
    logits = np.stack([row, rng.permutation(row)])
    topks = [head_topk(r, 10, 1.0) for r in logits]
    plain = DynamicSampler().joint(topks, np.array([]), None, PLAIN.replace(top_k=10)).copy()
    for blur in (0, 3):
        otsu = DynamicSampler().joint(
            topks, np.array([]), None, PLAIN.replace(top_k=10, adaptive=True, blur=blur)
        )
        kept = otsu > 0
        assert kept[0, 0] and kept.sum() < kept.size / 2  # the tail is cut
        np.testing.assert_array_equal(otsu[kept], plain[kept])  # survivors are untouched
        if blur == 0:  # Otsu on J itself is a cut in value
            assert otsu[kept].min() > plain[~kept].max()


def test_the_runtimes_cooccurrence_mask_plugs_in(tmp_path):
    """The sampler's CooccurrenceWeights contract, met by runtime.cooccurrence (float32, `orders`)."""
    vocab, rng = 20, np.random.default_rng(9)
    dense = random_masks(rng, vocab, 0.4)
    dense.tables[3] *= dense.tables[2][:, :, None] > 0  # a seen triple's prefix pair is seen
    mask = csr_masks(dense, tmp_path / "mask")
    emitted = []
    for seed in range(30):
        config = SamplingConfig(top_k=5, eps_b=(0.2, 0.7, 0.95)[seed % 3])
        logits = np.random.default_rng(seed).normal(size=(3, vocab)).astype(np.float32) * 2
        ties: list[str] = []
        expected = oracle.step(logits, [1, 2], mask, config, np.random.default_rng(seed), ties)
        fast = DynamicSampler().step(logits, [1, 2], mask, config, np.random.default_rng(seed))
        assert ties or (fast.tokens, fast.backoffs) == expected
        emitted.append(len(fast.tokens))
        # Same float32 weights as the dense stand-in the other tests use: the very same step.
        assert fast == DynamicSampler().step(logits, [1, 2], dense, config, np.random.default_rng(seed))
    assert {1, 3} <= set(emitted)  # emissions and back-offs both happened


# --- decisions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("masks_density", [None, 0.3])
def test_eps_b_one_is_exactly_ar_with_the_same_seed(masks_density):
    vocab, model = 60, FakeModel(60, n_heads=3, seed=7)
    masks = None if masks_density is None else random_masks(np.random.default_rng(3), vocab, masks_density)
    dynamic_config = SamplingConfig(eps_b=1.0, top_k=10)  # the paper's other defaults
    ar_rng, dynamic_rng = np.random.default_rng(11), np.random.default_rng(11)
    sampler = DynamicSampler()
    ar, dynamic = [5], [5]
    for _ in range(300):
        ar.append(sample_ar(model(ar)[0], ar, SamplingConfig(mode="ar", top_k=10), ar_rng))
        result = sampler.step(model(dynamic), dynamic, masks, dynamic_config, dynamic_rng)
        assert len(result.tokens) == 1 and result.backoffs == 2
        dynamic.extend(result.tokens)
    assert dynamic == ar
    assert len(set(ar)) > 20  # really sampled, not a constant stream


@pytest.mark.parametrize("n_heads", [2, 3])
def test_eps_b_zero_always_emits_n(n_heads):
    rng = np.random.default_rng(n_heads)
    sampler = DynamicSampler()
    masks = DenseMasks(rng.uniform(0.1, 5, (80, 80)), rng.uniform(0.1, 5, (80, 80, 80)))  # nothing unseen
    for config in [SamplingConfig(eps_b=0.0, top_k=20), SamplingConfig(eps_b=0.0, top_k=20, temperature=0)]:
        for step in range(100):
            logits = (rng.normal(size=(n_heads, 80)) * rng.choice([0.5, 5, 30])).astype(np.float32)
            generated = rng.integers(0, 80, size=step % 10)
            result = sampler.step(logits, generated, masks if step % 2 else None, config, rng)
            assert len(result.tokens) == n_heads and result.backoffs == 0


def test_eps_b_zero_backs_off_only_when_every_candidate_is_masked():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 30)).astype(np.float32)
    unseen = DenseMasks(np.zeros((30, 30)))
    result = DynamicSampler().step(logits, [], unseen, SamplingConfig(eps_b=0.0, top_k=5), rng)
    assert result.backoffs == 1 and len(result.tokens) == 1


def peaked_then_flat(vocab=100, top=4.0):
    """Head 1 sure of token 0, head 2 uniform: max J = f1(0) / vocab."""
    logits = np.zeros((2, vocab), dtype=np.float32)
    logits[0, 0] = top
    f1 = math.exp(top) / (math.exp(top) + vocab - 1)
    return logits, f1 / vocab


def test_back_off_happens_exactly_below_the_bound():
    logits, max_joint = peaked_then_flat()
    config = PLAIN.replace(top_k=5)
    above = config.replace(eps_b=max_joint * 0.999)
    below = config.replace(eps_b=max_joint * 1.001)
    assert len(DynamicSampler().step(logits, [], None, above, np.random.default_rng(0)).tokens) == 2
    result = DynamicSampler().step(logits, [], None, below, np.random.default_rng(0))
    assert result.backoffs == 1
    assert result.tokens == (sample_ar(logits[0], [], config, np.random.default_rng(0)),)


def test_three_heads_back_off_to_two():
    logits, _ = peaked_then_flat(top=8.0)  # f1(0) = 0.97
    sure = np.full((1, 100), -10, dtype=np.float32)
    sure[0, 7] = 10  # head 2 certain, head 3 (uniform) hopeless
    logits = np.concatenate([logits[:1], sure, logits[1:]])  # heads: peaked, certain, flat
    result = DynamicSampler().step(
        logits, [], None, PLAIN.replace(eps_b=0.5, top_k=5), np.random.default_rng(0)
    )
    assert result.backoffs == 1 and len(result.tokens) == 2 and result.tokens[1] == 7


# --- greedy and repetition penalty ------------------------------------------------------------


def test_greedy_takes_the_argmax_and_draws_nothing():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 200)).astype(np.float32)
    state = rng.bit_generator.state
    greedy = SamplingConfig(temperature=0, eps_b=0.0, top_k=8, alpha_c=0, adaptive=False, blur=0)
    assert sample_ar(logits[0], [], greedy, rng) == int(np.argmax(logits[0]))
    result = DynamicSampler().step(logits, [], None, greedy, rng)
    assert result.tokens == tuple(int(i) for i in np.argmax(logits, axis=1))
    assert rng.bit_generator.state == state


def test_repetition_penalty_divides_the_probability_of_generated_tokens():
    rng = np.random.default_rng(2)
    row = rng.normal(size=50).astype(np.float32)
    first, second = np.argsort(-row)[:2]
    config = SamplingConfig(top_k=10, temperature=1.0, repetition_penalty=1.7)
    plain = ar_distribution(row, [], config)
    penalised = ar_distribution(row, [int(first)], config)
    p = dict(zip(plain.ids.tolist(), plain.probs, strict=True))
    q = dict(zip(penalised.ids.tolist(), penalised.probs, strict=True))
    assert math.isclose(q[first] / q[second], p[first] / p[second] / 1.7, rel_tol=1e-12)
    # Greedy: a big enough penalty moves the argmax off a repeated token.
    greedy = config.replace(temperature=0, repetition_penalty=1e6)
    assert sample_ar(row, [int(first)], greedy, rng) == second


def test_repetition_penalty_on_the_grid_counts_each_token_ar_would_have_seen():
    """A cell is divided once per token that is generated or repeats an earlier token of the cell,
    as `ar` emitting the cell's tokens one by one would divide them (brute force over the cells)."""
    rng = np.random.default_rng(4)
    topks = [head_topk(row, 6, 1.0) for row in rng.normal(size=(3, 9)).astype(np.float32)]
    generated = [int(topks[0].ids[0]), int(topks[2].ids[1])]
    base = DynamicSampler().joint(topks, generated, None, PLAIN).copy()
    penalised = DynamicSampler().joint(topks, generated, None, PLAIN.replace(repetition_penalty=2.0))
    repeats = np.zeros(base.shape, dtype=int)
    for cell in itertools.product(*(range(t.ids.size) for t in topks)):
        tokens = [int(t.ids[i]) for t, i in zip(topks, cell, strict=True)]
        repeats[cell] = sum(x in generated or x in tokens[:i] for i, x in enumerate(tokens))
    np.testing.assert_allclose(penalised, base / 2.0**repeats, rtol=1e-15)
    fresh = [t for t in set(topks[0].ids.tolist()) & set(topks[1].ids.tolist()) if t not in generated]
    assert fresh, "the heads must share a candidate that was never generated"
    a, b = (int(np.flatnonzero(topks[axis].ids == fresh[0])[0]) for axis in (0, 1))
    assert (repeats[a, b] >= 1).all()  # (x, x, .) is penalised though x was never generated


# --- bad inputs --------------------------------------------------------------------------------


def test_non_finite_logits_and_bad_shapes_are_errors():
    sampler, rng = DynamicSampler(), np.random.default_rng()
    bad = np.zeros((2, 10), dtype=np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(SamplingError, match="NaN"):
        sampler.step(bad, [], None, SamplingConfig(), rng)
    with pytest.raises(SamplingError, match="n_heads, vocab"):
        sampler.step(np.zeros(10, np.float32), [], None, SamplingConfig(), rng)
    wrong = DenseMasks(np.ones((10, 10)))
    for cells in ([0, 9], [2, 1], [1, 1], [-1, 2]):  # off the 3 x 3 grid, descending, repeated, negative
        wrong.hits = lambda ids, cells=cells: (np.array(cells), np.ones(2, np.float32))
        with pytest.raises(SamplingError, match="candidate grid"):
            sampler.step(np.zeros((2, 10), np.float32), [], wrong, SamplingConfig(top_k=3, eps_b=0.0), rng)
    wrong.hits = lambda ids: (np.array([0, 1]), np.ones(3, np.float32))
    with pytest.raises(SamplingError, match="one weight each"):
        sampler.step(np.zeros((2, 10), np.float32), [], wrong, SamplingConfig(top_k=3, eps_b=0.0), rng)


# --- config ------------------------------------------------------------------------------------


def test_defaults_are_the_papers_and_eps_b_the_reference_sweeps():
    c = SamplingConfig()
    assert (c.mode, c.top_k, c.temperature, c.repetition_penalty, c.alpha_c) == ("dynamic", 50, 0.7, 1.1, 1.0)
    assert (c.adaptive, c.blur, c.static_threshold, c.stop) == (True, 3, 0.0, ())
    assert c.eps_b == 0.6  # runtime/config.py: the fastest eps_b that kept ar's quality in `make bench`


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mode": "beam"}, "mode"),
        ({"eps_b": 1.5}, "eps_b"),
        ({"eps_b": float("nan")}, "eps_b"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 101}, "top_k"),
        ({"top_k": 5.0}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 0.9}, "repetition_penalty"),
        ({"alpha_c": -1}, "alpha_c"),
        ({"adaptive": 1}, "adaptive"),
        ({"blur": 2}, "blur"),
        ({"blur": -3}, "blur"),
        ({"static_threshold": 1.0}, "static_threshold"),
        ({"stop": ["", 3]}, "stop"),
        ({"stop": [-1]}, "stop"),
        ({"stop": [True]}, "stop"),
    ],
)
def test_invalid_options_are_rejected_by_name(changes, named):
    with pytest.raises(SamplingConfigError, match=rf"\b{named}\b"):
        SamplingConfig(**changes)
    with pytest.raises(SamplingConfigError, match=rf"\b{named}\b"):
        SamplingConfig().replace(**changes)


def test_conflicts_and_unknown_options_are_named():
    with pytest.raises(SamplingConfigError, match=r"blur=3 conflicts with adaptive=False"):
        SamplingConfig(adaptive=False)
    assert SamplingConfig(adaptive=False, blur=0).blur == 0
    with pytest.raises(SamplingConfigError, match=r"top_k=0.*temperature=-1"):  # every problem at once
        SamplingConfig(top_k=0, temperature=-1)
    with pytest.raises(SamplingConfigError, match=r"unknown options \['topk'\]"):
        SamplingConfig.from_manifest_defaults({"topk": 5})
    with pytest.raises(SamplingConfigError, match="unknown options"):
        SamplingConfig().replace(eps=0.1)


def test_manifest_round_trip_and_normalised_values():
    config = SamplingConfig(eps_b=0.25, stop=["\n\n", np.int64(0)], temperature=0)
    again = SamplingConfig.from_manifest_defaults(config.to_dict())
    assert again == config and again.stop == ("\n\n", 0) and type(again.stop[1]) is int
    assert SamplingConfig(stop="END").stop == ("END",)
    assert SamplingConfig.from_manifest_defaults({}) == SamplingConfig()
    assert config.greedy and not SamplingConfig().greedy
