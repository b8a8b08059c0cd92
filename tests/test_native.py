"""The compiled sampler kernel (runtime/_native.c via runtime/native.py) against the numpy path and
the whole-grid definition, bit for bit, and against the plain reference within its ties."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runtime import _native, native
from runtime.config import SamplingConfig
from runtime.dynamic import DynamicSampler
from runtime.errors import SamplingError
from runtime.marginals import head_topk, heads_topk
from tests import oracle
from tests.sampling_definitions import csr_masks, random_masks, whole_grid_joint

# The kernel's configurations: alpha_c = 1, blur 0/1/3, Otsu on or off, any threshold.
KERNEL_CONFIGS = [
    SamplingConfig(),  # the paper's defaults
    SamplingConfig(blur=0),
    SamplingConfig(blur=1, repetition_penalty=3.0),
    SamplingConfig(adaptive=False, blur=0),
    SamplingConfig(static_threshold=1e-6, temperature=1.3),
    SamplingConfig(static_threshold=0.02),
]


def test_the_install_built_the_kernel():
    """`pip install` compiles it (README set-up); a missing compiler would silently cost the speed."""
    assert native.AVAILABLE


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """(vocab, mask) pairs: sparse and dense n-gram tables."""
    rng = np.random.default_rng(4)
    return [
        (64, csr_masks(random_masks(rng, 64, density), tmp_path_factory.mktemp("masks") / f"mask{density}"))
        for density in (0.05, 0.3, 0.9)
    ]


@pytest.mark.parametrize(
    "config", KERNEL_CONFIGS, ids=lambda c: f"blur{c.blur}-ad{c.adaptive}-st{c.static_threshold}"
)
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat to peaked marginals
def test_kernel_joint_equals_numpy_and_the_whole_grid_definition(masks, config, scale):
    rng = np.random.default_rng(int(scale * 10))
    compiled, plain = DynamicSampler(), DynamicSampler(use_native=False)
    assert native.supports_grid(3, 50**3, config)
    for vocab, mask in masks:
        for top_k in (50, 7, 1):
            logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
            generated = rng.integers(0, vocab, size=30)
            topks = [head_topk(row, top_k, config.temperature or 1.0) for row in logits]
            for n in (3, 2, 3):  # 3 again: the pair grid kept from the call before is the right one
                expected = whole_grid_joint(topks[:n], generated, mask, config)
                np.testing.assert_array_equal(compiled.joint(topks[:n], generated, mask, config), expected)
                np.testing.assert_array_equal(plain.joint(topks[:n], generated, mask, config), expected)


def test_kernel_does_not_reuse_pairs_across_masks(masks):
    """The pair grid kept for a back-off belongs to one mask: another with the same ids gets its own."""
    sampler, config = DynamicSampler(), SamplingConfig(adaptive=False, blur=0)
    topks = [
        head_topk(row, 10, 1.0) for row in np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)
    ]
    for _vocab, mask in masks + masks:
        np.testing.assert_array_equal(
            sampler.joint(topks, [], mask, config), whole_grid_joint(topks, [], mask, config)
        )


def with_wide_indices(mask):
    """The mask with int32 column indices in its kernel tables, as a vocabulary over 65536 has."""
    tables = mask.csr_tables()
    assert tables.pair_indices.dtype == np.uint16 and tables.triple_indices.dtype == np.uint16
    wide = copy.copy(mask)
    wide._csr_tables = tables._replace(
        pair_indices=tables.pair_indices.astype(np.int32),
        triple_indices=tables.triple_indices.astype(np.int32),
    )
    return wide


@pytest.mark.parametrize("eps_b", [0.0, 0.05, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("indices", ["uint16", "int32"])
def test_kernel_steps_equal_numpy_steps(masks, eps_b, temperature, indices):
    """Same tokens, same back-offs, same random numbers consumed, over a run of steps."""
    if indices == "int32":
        masks = [(vocab, with_wide_indices(mask)) for vocab, mask in masks]
    rng = np.random.default_rng(int(eps_b * 100) + int(temperature * 10))
    config = SamplingConfig(eps_b=eps_b, temperature=temperature)
    compiled, plain = DynamicSampler(), DynamicSampler(use_native=False)
    assert native.supports_step(masks[0][1], config, 3, config.top_k)  # the whole step is one kernel call
    lengths = set()
    for step in range(30):
        vocab, mask = masks[step % len(masks)]
        logits = (rng.normal(size=(3, vocab)) * rng.choice([0.5, 3.0, 12.0])).astype(np.float32)
        generated = rng.integers(0, vocab, size=int(rng.integers(0, 20)))
        seed = int(rng.integers(2**32))
        fast_rng, plain_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        result = compiled.step(logits, generated, mask, config, fast_rng)
        assert result == plain.step(logits, generated, mask, config, plain_rng)
        assert fast_rng.bit_generator.state == plain_rng.bit_generator.state
        lengths.add(len(result.tokens))
    if 0 < eps_b < 1:
        assert len(lengths) > 1, "the steps should both emit and back off"


def test_kernel_step_that_skips_three_tokens_looks_its_pairs_up(masks):
    """A flat third head caps J at n = 3 below the bound before any lookup; n = 2 must then find
    its own pairs, not a grid left from another step (or never written, on a sampler's first)."""
    rng = np.random.default_rng(8)
    config = SamplingConfig(top_k=5, eps_b=0.5, adaptive=False, blur=0)
    compiled, plain = DynamicSampler(), DynamicSampler(use_native=False)
    _vocab, mask = masks[1]
    emitted = set()
    for _ in range(40):
        logits = (rng.normal(size=(3, 64)) * 6.0).astype(np.float32)
        logits[2] = rng.normal(size=64).astype(np.float32) * 0.01  # top-5 mass ~5/64: M3 < 0.25
        seed = int(rng.integers(2**32))
        result = compiled.step(logits, [], mask, config, np.random.default_rng(seed))
        assert result == plain.step(logits, [], mask, config, np.random.default_rng(seed))
        emitted.add(len(result.tokens))
    assert emitted == {1, 2}, "steps should back off to pairs and emit them"


@st.composite
def kernel_steps(draw):
    n_heads = draw(st.sampled_from([2, 3]))
    adaptive = draw(st.booleans())
    config = SamplingConfig(
        eps_b=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9])),
        top_k=draw(st.integers(1, 6)),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 2.5])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.1, 3.0])),
        adaptive=adaptive,
        blur=draw(st.sampled_from([0, 1, 3])) if adaptive else 0,
        static_threshold=draw(st.sampled_from([0.0, 1e-3, 0.02])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocab = 24
    logits = (rng.normal(size=(n_heads, vocab)) * draw(st.sampled_from([0.3, 2.0, 8.0]))).astype(np.float32)
    generated = rng.integers(0, vocab, size=int(rng.integers(0, 6)))
    return logits, generated, draw(st.integers(0, 2)), config, int(rng.integers(2**32))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel_steps())
def test_kernel_step_equals_the_reference(small_masks, case):
    logits, generated, which, config, seed = case
    mask = small_masks[which]
    ties: list[str] = []
    expected = oracle.step(logits, generated, mask, config, np.random.default_rng(seed), ties)
    for n in range(2, logits.shape[0] + 1):
        heads = [oracle.candidates(row, config.top_k, config.temperature or 1.0) for row in logits[:n]]
        oracle.grid_joint(heads, generated, mask, config, ties)
    assume(not ties)  # a decision exactly on a boundary is a coin toss between roundings
    result = DynamicSampler().step(logits, generated, mask, config, np.random.default_rng(seed))
    assert (result.tokens, result.backoffs) == expected


@pytest.fixture(scope="module")
def small_masks(tmp_path_factory):
    rng = np.random.default_rng(11)
    return [
        csr_masks(random_masks(rng, 24, density), tmp_path_factory.mktemp("masks") / f"small{density}")
        for density in (0.2, 0.6, 1.0)
    ]


def topk_cases():
    rng = np.random.default_rng(5)
    outputs = rng.normal(size=(3, 4, 8192)).astype(np.float32)
    with_inf = rng.normal(size=(2, 300)).astype(np.float32)
    with_inf[:, ::7] = -np.inf
    return {
        "reference vocab": rng.normal(size=(3, 8192)).astype(np.float32) * 4,
        "pythia vocab": rng.normal(size=(3, 50304)).astype(np.float32),
        "ties": np.round(rng.normal(size=(3, 700)), 1).astype(np.float32),
        "all equal": np.zeros((2, 97), dtype=np.float32),
        "-inf entries": with_inf,
        "last position of an output": outputs[:, -1],  # rows 4 * 8192 floats apart
        "one row": outputs[0, 2][None],
        "spread past exp's floor": rng.normal(size=(2, 1000)).astype(np.float32) * 400,  # e^z underflows
        "fewer tokens than a lane block": rng.normal(size=(3, 7)).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(topk_cases()))
def test_kernel_topk_equals_numpy(name):
    logits = topk_cases()[name]
    for top_k in (1, 50, logits.shape[1]):
        for temperature in (0.05, 0.7, 1.0):
            fast = heads_topk(logits, top_k, temperature)
            plain = heads_topk(logits, top_k, temperature, use_native=False)
            for f, p in zip(fast, plain, strict=True):
                np.testing.assert_array_equal(f.ids, p.ids)
                np.testing.assert_array_equal(f.probs, p.probs)
    # And the reference's ranking: descending logit, ties by ascending id.
    expected = [[t for t, _ in oracle.candidates(row, 50, 1.0)] for row in logits]
    assert [t.ids.tolist() for t in heads_topk(logits, 50, 1.0)] == expected


def test_non_finite_logits_are_errors_on_either_path():
    logits = np.zeros((2, 64), dtype=np.float32)
    logits[1, 5] = np.nan
    for use_native in (True, False):
        with pytest.raises(SamplingError, match="NaN"):
            heads_topk(logits, 5, 1.0, use_native)


def test_kernel_rejects_buffers_that_do_not_fit():
    """The C side checks sizes itself: a wrong call is a ValueError, never a stray read."""
    ids = np.arange(4, dtype=np.int64)
    probs = np.full(4, 0.25)
    pair_indptr = np.zeros(9, dtype=np.int64)  # an 8-token vocabulary with no pairs
    empty_i, empty_f = np.empty(0, np.int32), np.empty(0, np.float32)
    rank = np.full(8, -1, dtype=np.int32)
    cells = 4

    def call(ids=ids, rank=rank, out=cells):
        return _native.joint(
            (2, 2), ids, probs, pair_indptr, empty_i, empty_f, np.zeros(1, np.int64), empty_i, empty_f,
            rank, 1.0, -1.0, 0.0, 1, 3, np.empty(out, np.int64), np.empty(out), np.zeros(3 * out),
            np.empty(5 * out, np.int64), np.zeros(out, np.uint8), np.empty(4, np.int64), 0,
        )  # fmt: skip

    assert call() == 0  # nothing stored: J = 0
    with pytest.raises(ValueError, match="do not fit the grid"):
        call(out=3)
    with pytest.raises(ValueError, match="tables' sizes do not agree"):
        call(rank=np.full(9, -1, dtype=np.int32))  # vocabulary disagrees with the pair table
    with pytest.raises(ValueError, match="outside the vocabulary"):
        call(ids=np.array([0, 1, 2, 8], dtype=np.int64))

    tables = [pair_indptr, empty_i, empty_f, np.zeros(1, np.int64), empty_i, empty_f]
    one_pair = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1], np.int64)  # token 0 -> 1, and no triples

    def stepper(k=2, heads=2, tables=tables, bounds=None, blur=3):
        built = _native.Stepper(k, heads, *tables)
        built.configure(np.zeros(heads + 1) if bounds is None else bounds, 1.0, 0.0, 1.1, 1, blur, 0)
        return built

    logits, seen, random = np.zeros((2, 8), np.float32), np.zeros(8, bool), np.random.default_rng(0).random
    assert len(stepper().step(logits, seen, random)) == 1  # nothing stored: head 1 alone
    assert len(stepper().step(np.zeros((3, 8), np.float32), seen, random)) == 1  # extra rows: unread
    for wrong, message in (
        ({"k": 9}, "k <= vocab"),  # more candidates than tokens
        (
            {"heads": 3, "tables": [one_pair, np.ones(1, np.int32), np.ones(1, np.float32), *tables[3:]]},
            "triple table",
        ),
        ({"heads": 4}, "2 or 3 heads"),
        ({"bounds": np.zeros(2)}, "bounds"),  # none for n = 2
        ({"heads": 2, "bounds": np.zeros(4)}, "bounds"),
        ({"blur": 5}, "blur"),
        (
            {"tables": [pair_indptr, np.zeros(1, np.int32), *tables[2:]]},
            "sizes do not agree",
        ),  # 1 index, 0 values
    ):
        with pytest.raises(ValueError, match=message):
            stepper(**wrong)
    with pytest.raises(ValueError, match="not configured"):
        _native.Stepper(2, 2, *tables).step(logits, seen, random)
    for logits_, seen_ in (
        (logits, np.zeros(7, bool)),  # the generated-token mask does not cover the vocabulary
        (logits[:1], seen),  # fewer rows than heads
        (np.zeros((2, 9), np.float32), np.zeros(9, bool)),  # another vocabulary
    ):
        with pytest.raises(ValueError, match=r"Stepper\.step"):
            stepper().step(logits_, seen_, random)
    for unread in (
        logits.astype(np.float16),
        logits.reshape(-1),
        logits[:, ::2],
        np.zeros((4, 2, 8), np.float32),
    ):
        assert stepper().step(unread, seen, random) is NotImplemented  # not (heads, vocab) float32 rows
    with pytest.raises(ValueError, match="buffer sizes"):  # 11 of a 10-token vocabulary
        _native.marginals(np.zeros((1, 10), np.float32), 11, 1.0, np.empty(11, np.int64), np.empty(11))
    with pytest.raises(ValueError, match="buffer sizes"):  # no room for the second row's candidates
        _native.marginals(np.zeros((2, 10), np.float32), 1, 1.0, np.empty(1, np.int64), np.empty(2))
