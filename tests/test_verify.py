"""verify mode (runtime/verify.py, and its compiled twin): the conditioned draft distribution against
a brute force over the whole vocabulary, the numpy and C paths bit for bit, and the promise that
matters: whatever q the drafts use, the emitted tokens are distributed exactly as `ar`'s."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from runtime import native
from runtime.config import SamplingConfig
from runtime.draws import sample_ar
from runtime.errors import SamplingError
from runtime.marginals import TopK, head_topk
from runtime.tokensets import SeenTokens, tokens_plus
from runtime.verify import (
    MARGINAL,
    Draft,
    Verifier,
    ar_distribution,
    draft_distribution,
    draft_tokens,
    draw_residual,
    verify_drafts,
)
from tests import oracle
from tests.sampling_definitions import DenseMasks, FakeModel, csr_masks, random_masks

# Each statistical test below fails a correct implementation with probability ALPHA for a
# random seed; the seeds are fixed, so the suite is deterministic.
ALPHA = 1e-3


# --- the draft distribution q ------------------------------------------------------------------


def pair_and_triple_masks(vocab: int, rng: np.random.Generator, density: float = 0.3) -> DenseMasks:
    masks = random_masks(rng, vocab, density)
    masks.tables[3] *= masks.tables[2][:, :, None] > 0  # a seen triple's prefix pair is seen
    return masks


@pytest.fixture(scope="module")
def small_csr(tmp_path_factory):
    """(vocab, dense stand-in, the same weights as the runtime's CSR masks) at a few densities."""
    rng = np.random.default_rng(21)
    found = []
    for density in (0.05, 0.3, 0.9):
        dense = pair_and_triple_masks(30, rng, density)
        found.append((30, dense, csr_masks(dense, tmp_path_factory.mktemp("masks") / f"d{density}")))
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.integers(1, 3))
def test_conditioned_q_equals_the_brute_force_over_the_vocabulary(small_csr, seed, alpha_c, prefix_len):
    rng = np.random.default_rng(seed)
    vocab, dense, csr = small_csr[int(rng.integers(3))]
    config = SamplingConfig(
        mode="verify",
        top_k=int(rng.integers(1, 12)),
        temperature=float(rng.choice([0.3, 0.7, 1.0])),
        repetition_penalty=float(rng.choice([1.0, 1.3])),
        alpha_c=alpha_c,
    )
    row = (rng.normal(size=vocab) * 3).astype(np.float32)
    prefix = [int(t) for t in rng.integers(0, vocab, prefix_len)]
    generated = [int(t) for t in rng.integers(0, vocab, 4)]
    expected = oracle.draft(row, prefix, generated, dense, config)
    top = head_topk(row, config.top_k, config.temperature)
    for masks in (dense, csr):
        q, order = draft_distribution(top, prefix, tokens_plus(generated, prefix), masks, config)
        assert math.isclose(q.probs.sum(), 1.0, rel_tol=1e-12)
        got = np.zeros(vocab)
        got[q.ids] = q.probs
        np.testing.assert_allclose(got, [expected[t] for t in range(vocab)], rtol=1e-12, atol=1e-300)
        assert order == MARGINAL or (alpha_c > 0 and 2 <= order <= min(prefix_len + 1, 3))


def test_q_falls_back_from_triples_to_pairs_to_the_marginal():
    vocab = 12
    pair, triple = np.zeros((vocab, vocab)), np.zeros((vocab, vocab, vocab))
    pair[1, 2] = 4.0  # (1, 2) is seen, and continues with 5
    triple[1, 2, 5] = 8.0
    pair[2, 6] = 3.0  # after 2 alone, 6
    masks = DenseMasks(pair, triple)
    row = np.zeros(vocab, dtype=np.float32)  # a flat head: q is W's shape
    config = SamplingConfig(mode="verify", top_k=vocab, temperature=1.0, repetition_penalty=1.0)
    top = head_topk(row, vocab, 1.0)

    def q_of(prefix):
        q, order = draft_distribution(top, prefix, tokens_plus([], prefix), masks, config)
        dist = np.zeros(vocab)
        dist[q.ids] = q.probs
        return dist, order

    dist, order = q_of([1, 2])  # the triple row holds a candidate: triples
    assert order == 3 and dist[5] == 1.0
    dist, order = q_of([3, 2])  # (3, 2) unseen: pairs after 2
    assert order == 2 and dist[6] == 1.0
    dist, order = q_of([9])  # nothing after 9: the marginal
    assert order == MARGINAL and np.allclose(dist, 1 / vocab)
    without = DenseMasks(pair)  # pairs only: head 3 conditions on the draft before it
    q, order = draft_distribution(top, [1, 2], tokens_plus([], [1, 2]), without, config)
    assert order == 2 and q.probs[q.ids == 6][0] == 1.0
    q, order = draft_distribution(top, [1, 2], tokens_plus([], [1, 2]), masks, config.replace(alpha_c=0.0))
    assert order == MARGINAL


def test_q_renormalises_the_weighted_candidates_it_keeps():
    """Candidates the masks never saw after the context get q = 0; the others share all the mass."""
    rng = np.random.default_rng(3)
    vocab = 20
    pair = (rng.random((vocab, vocab)) < 0.4) * rng.uniform(0.5, 4.0, (vocab, vocab))
    masks = DenseMasks(pair)
    config = SamplingConfig(mode="verify", top_k=8, repetition_penalty=1.0)
    row = rng.normal(size=vocab).astype(np.float32)
    top = head_topk(row, 8, config.temperature)
    context = next(a for a in range(vocab) if pair[a, top.ids].any() and not pair[a, top.ids].all())
    q, order = draft_distribution(top, [context], tokens_plus([], [context]), masks, config)
    assert order == 2
    seen = pair[context, q.ids] > 0
    assert not q.probs[~seen].any() and math.isclose(q.probs[seen].sum(), 1.0, rel_tol=1e-12)
    expected = top.probs[seen] * pair[context, q.ids[seen]].astype(np.float32)
    np.testing.assert_allclose(q.probs[seen], expected / expected.sum(), rtol=1e-12)


# --- the compiled twin -------------------------------------------------------------------------


@st.composite
def verify_cases(draw):
    config = SamplingConfig(
        mode="verify",
        top_k=draw(st.integers(1, 10)),
        temperature=draw(st.sampled_from([0.0, 0.5, 0.7, 1.3])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.1, 3.0])),
        alpha_c=draw(st.sampled_from([0.0, 1.0])),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_drafts = draw(st.integers(1, 2))
    scale = draw(st.sampled_from([0.5, 3.0, 10.0]))
    return config, rng, n_drafts, scale, draw(st.integers(0, 2)), draw(st.booleans())


@pytest.mark.skipif(not native.AVAILABLE, reason="the compiled kernel is not built")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verify_cases())
def test_compiled_verify_equals_numpy_bit_for_bit(small_csr, case):
    config, rng, n_drafts, scale, which, with_masks = case
    vocab, _dense, csr = small_csr[which]
    masks = csr if with_masks else None
    seen = SeenTokens(vocab)
    seen.add([int(t) for t in rng.integers(0, vocab, 5)])
    after = int(rng.integers(vocab))
    draft_rows = (rng.normal(size=(n_drafts, vocab)) * scale).astype(np.float32)
    seed = int(rng.integers(2**32))
    compiled, plain = np.random.default_rng(seed), np.random.default_rng(seed)
    context = tokens_plus(seen, [int(rng.integers(vocab)), after])
    fast = Verifier().draft(draft_rows, after, context, masks, config, compiled)
    slow = draft_tokens(draft_rows, after, context, masks, config, plain)
    assert (fast.tokens, fast.orders) == (slow.tokens, slow.orders)
    for f, s in zip(fast.dists, slow.dists, strict=True):
        np.testing.assert_array_equal(f.ids, s.ids)
        np.testing.assert_array_equal(f.probs, s.probs)
    assert compiled.bit_generator.state == plain.bit_generator.state
    head1 = (rng.normal(size=(n_drafts + 1, vocab)) * scale).astype(np.float32)
    for j, token in enumerate(fast.tokens):  # head 1 agrees with some drafts: acceptances happen
        if rng.random() < 0.5:
            head1[j, token] += 8.0
    for generated in (seen, tokens_plus(seen, [after])):
        verdict = Verifier().check(head1, fast, generated, masks, config, compiled)
        assert verdict == verify_drafts(head1, slow, generated, config, plain)
        assert compiled.bit_generator.state == plain.bit_generator.state


@pytest.mark.skipif(not native.AVAILABLE, reason="the compiled kernel is not built")
def test_compiled_verify_refuses_what_numpy_refuses():
    config = SamplingConfig(mode="verify", top_k=2)
    q = TopK(np.array([1, 2]), np.array([0.5, 0.5]))
    rows = np.zeros((2, 5), np.float32)
    with pytest.raises(SamplingError, match="probability 0"):
        Verifier().check(rows, Draft((3,), (q,), (MARGINAL,)), [0], None, config, np.random.default_rng())
    nan = rows.copy()
    nan[0, 1] = np.nan
    with pytest.raises(SamplingError, match="NaN"):
        Verifier().check(nan, Draft((1,), (q,), (MARGINAL,)), [0], None, config, np.random.default_rng())
    with pytest.raises(SamplingError, match="NaN"):
        Verifier().draft(nan[:1], 0, [0], None, config, np.random.default_rng())


# --- exactness: the output is `ar`'s -----------------------------------------------------------


def verify_three_tokens(model, drafter, context, masks, config, rng, dists_override=None, verifier=None):
    """Three tokens from one verify step (drafts of 2 heads after context[-1]), topped up with `ar`."""
    verifier = verifier or Verifier(use_native=False)
    draft = verifier.draft(drafter(context)[1:], context[-1], context, masks, config, rng)
    if dists_override is not None:
        draft = Draft(draft.tokens, dists_override(context, draft.tokens), draft.orders)
    prefixes = [context, [*context, draft.tokens[0]], [*context, *draft.tokens]]
    head1 = np.stack([model(p)[0] for p in prefixes])
    result = verifier.check(head1, draft, context, masks, config, rng)
    tokens = list(result.tokens)
    while len(tokens) < 3:
        tokens.append(sample_ar(model(context + tokens)[0], context + tokens, config, rng))
    return tuple(tokens[:3]), result.accepted


def exact_ar_joint(model, context, config, vocab):
    """P(x1, x2, x3) of sampling three tokens with `ar`, from the oracle's distributions."""
    probs = np.zeros((vocab,) * 3)
    for a, pa in oracle.ar_distribution(model(context)[0], context, config).items():
        for b, pb in oracle.ar_distribution(model([*context, a])[0], [*context, a], config).items():
            third = oracle.ar_distribution(model([*context, a, b])[0], [*context, a, b], config)
            for c, pc in third.items():
                probs[a, b, c] = pa * pb * pc
    return probs


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test, cells expected under 5 pooled into one."""
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    small = expected < 5
    assert observed[expected == 0].sum() == 0  # impossible sequences never appear
    f_exp = np.append(expected[~small], expected[small].sum())
    f_obs = np.append(observed[~small], observed[small].sum())
    return stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue


@pytest.mark.slow
@pytest.mark.parametrize("use_native", [False, True])
def test_verify_with_conditioned_drafts_yields_exactly_ar_distribution(use_native):
    vocab, trials = 5, 12_000
    model, drafter = FakeModel(vocab, 1, seed=1, scale=1.0), FakeModel(vocab, 3, seed=2, scale=1.0)
    rng = np.random.default_rng(2024)
    masks = pair_and_triple_masks(vocab, np.random.default_rng(5), density=0.5)
    config = SamplingConfig(mode="verify", top_k=4, temperature=0.9, repetition_penalty=1.5)
    verifier, context = Verifier(use_native=use_native), [0, 1]
    counts, accepted = np.zeros((vocab,) * 3), np.zeros(3, dtype=int)
    for _ in range(trials):
        tokens, n_accepted = verify_three_tokens(
            model, drafter, context, masks, config, rng, verifier=verifier
        )
        counts[tokens] += 1
        accepted[n_accepted] += 1
    assert accepted.min() > 0.02 * trials  # rejections, partial and full acceptance all happen
    p_value = chi_square_p(counts, exact_ar_joint(model, context, config, vocab))
    print(f"verify vs ar: chi-square p = {p_value:.3f}, accepted drafts histogram {accepted.tolist()}")
    assert p_value > ALPHA


def test_verify_statistical_test_detects_a_wrong_acceptance():
    """Negative control: claiming q = p makes every draft pass; the test above must notice."""
    vocab, trials = 5, 4000
    model, drafter = FakeModel(vocab, 1, seed=1, scale=1.0), FakeModel(vocab, 3, seed=2, scale=1.0)
    # top_k = vocab, so that every draft has positive probability under the claimed q.
    config = SamplingConfig(mode="verify", top_k=5, temperature=0.9, repetition_penalty=1.5)
    rng, context = np.random.default_rng(7), [0, 1]

    def target_as_draft(ctx, tokens):
        after = [*ctx, tokens[0]]
        return (ar_distribution(model(ctx)[0], ctx, config), ar_distribution(model(after)[0], after, config))

    counts = np.zeros((vocab,) * 3)
    for _ in range(trials):
        tokens, _ = verify_three_tokens(model, drafter, context, None, config, rng, target_as_draft)
        counts[tokens] += 1
    assert chi_square_p(counts, exact_ar_joint(model, context, config, vocab)) < 1e-6


def test_greedy_verify_equals_greedy_ar():
    vocab, n_heads = 12, 3
    model = FakeModel(vocab, n_heads, seed=3, scale=0.5)
    masks = pair_and_triple_masks(vocab, np.random.default_rng(1), density=0.5)
    config = SamplingConfig(mode="verify", temperature=0, top_k=6, repetition_penalty=1.3)
    rng = np.random.default_rng(0)
    ar = [4]
    while len(ar) < 65:
        ar.append(sample_ar(model(ar)[0], ar, config, rng))
    for verifier in (Verifier(use_native=False), Verifier()):
        out = [4]
        out.append(sample_ar(model(out)[0], out, config, rng))
        accepted = 0
        while len(out) < 65:
            draft = verifier.draft(model(out[:-1])[1:], out[-1], out, masks, config, rng)
            rows = np.stack([model(out + list(draft.tokens[:j]))[0] for j in range(n_heads)])
            result = verifier.check(rows, draft, out, masks, config, rng)
            accepted += result.accepted
            out.extend(result.tokens)
        assert out[:65] == ar
        assert accepted > 0


# --- the residual and small pieces ---------------------------------------------------------------


def dense_residual_draw(p: TopK, q: TopK, vocab: int, u: float) -> int:
    """norm(max(0, p - q)) over the whole vocabulary, drawn by one running sum in id order."""
    residual = np.zeros(vocab)
    residual[p.ids] = p.probs
    residual[q.ids] -= q.probs
    residual = np.maximum(residual, 0.0)
    if not residual.any():
        residual[p.ids] = p.probs
    cdf = np.cumsum(residual)
    above = np.flatnonzero(cdf > u * cdf[-1])
    return int(above[0]) if above.size else int(np.flatnonzero(residual > 0)[-1])


def test_residual_draw_over_p_candidates_equals_the_whole_vocabulary():
    rng = np.random.default_rng(4)
    vocab = 40
    for case in range(600):
        k_p, k_q = rng.integers(1, 12, size=2)
        p_ids = rng.choice(vocab, size=k_p, replace=False)
        p_probs = rng.dirichlet(np.ones(k_p))
        if case % 3:  # different candidates
            q_ids, q_probs = rng.choice(vocab, size=k_q, replace=False), rng.dirichlet(np.ones(k_q))
        else:  # the same candidates; every sixth case the same probabilities too (no residual)
            q_ids, q_probs = p_ids.copy(), p_probs.copy() if case % 2 else rng.dirichlet(np.ones(k_p))
        p, q = TopK(p_ids, p_probs), TopK(q_ids, q_probs)
        seed = int(rng.integers(1 << 30))
        u = np.random.default_rng(seed).random()
        assert draw_residual(p, q, np.random.default_rng(seed)) == dense_residual_draw(p, q, vocab, u)
        residual = oracle.residual(
            dict(zip(p_ids.tolist(), p_probs, strict=True)), dict(zip(q_ids.tolist(), q_probs, strict=True))
        )
        assert residual.get(dense_residual_draw(p, q, vocab, u), 0.0) > 0


def test_token_set_plus_drafts_is_the_union():
    base = np.array([3, 9, 9, 1])
    extended = tokens_plus(base, [5, 3])
    ids = np.arange(12)
    np.testing.assert_array_equal(extended.contains(ids), np.isin(ids, [1, 3, 5, 9]))
    assert tokens_plus([], []).any is False and tokens_plus([], [2]).any is True
    np.testing.assert_array_equal(tokens_plus(extended, [11]).contains(ids), np.isin(ids, [1, 3, 5, 9, 11]))


def test_verify_rejects_inconsistent_inputs():
    config = SamplingConfig(mode="verify")
    dist = TopK(np.array([1, 2]), np.array([0.5, 0.5]))
    with pytest.raises(SamplingError, match="3 rows"):
        verify_drafts(
            np.zeros((2, 5), np.float32), Draft((1, 2), (dist, dist)), [0], config, np.random.default_rng()
        )
    with pytest.raises(SamplingError, match="probability 0"):
        verify_drafts(
            np.zeros((2, 5), np.float32), Draft((3,), (dist,)), [0], config, np.random.default_rng()
        )


@pytest.mark.skipif(not native.AVAILABLE, reason="the compiled kernel is not built")
def test_compiled_drafts_with_many_generated_extras_stay_equal_to_numpy(small_csr):
    """Generated tokens outside the mask (up to the kernel's limit, and past it: numpy) with the
    smallest scratch (top_k = 1): the kernel's lookups must stay intact from call to call."""
    vocab, _dense, csr = small_csr[2]
    config = SamplingConfig(mode="verify", top_k=1, repetition_penalty=1.3)
    verifier, rng = Verifier(), np.random.default_rng(0)
    for step in range(200):
        extras = [int(t) for t in rng.integers(0, vocab, 8 if step % 2 else 70)]
        context = tokens_plus([1, 2], extras)
        rows = (rng.normal(size=(2, vocab)) * 4).astype(np.float32)
        after = int(rng.integers(vocab))
        fast = verifier.draft(rows, after, context, csr, config, np.random.default_rng(step))
        slow = draft_tokens(rows, after, context, csr, config, np.random.default_rng(step))
        assert (fast.tokens, fast.orders) == (slow.tokens, slow.orders)
        np.testing.assert_array_equal(
            np.stack([q.probs for q in fast.dists]), np.stack([q.probs for q in slow.dists])
        )
