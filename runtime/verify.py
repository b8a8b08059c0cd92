"""The `verify` sampler: speculative sampling with head 1 as the judge (beyond the paper).

    draft:    heads 2..n draft the tokens after the one head 1 just chose
    check:    head 1, at the fed positions, accepts draft x with probability min(1, p(x) / q(x))
    residual: at the first rejection, one token from norm(max(0, p - q)) ends the pass

The emitted tokens are distributed exactly as `ar` sampling from head 1 gives them, for
any draft distribution q that is known. The drafts come from DynaMo's own joint conditioned
on what is already fixed (docs/METHOD.md, "Verify mode"): head i's marginal f_i over its
top-k times the co-occurrence weight of the n-gram its token would complete,

    q_2(b) ~ f_2(b) W(a, b) ** alpha_c,   q_3(c) ~ f_3(c) W(a, b, c) ** alpha_c

with a the token head 1 just chose and b the draft before, each divided by the repetition
penalty where the token was generated (or drafted before it) and normalised over the top-k.
Where the masks hold no entry of that n-gram for any candidate, q falls back to a shorter
context (W(b, c) for head 3), then to the marginal; alpha_c = 0 gives the marginal drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.config import SamplingConfig
from runtime.draws import draw, draw_head1, penalised
from runtime.errors import SamplingError
from runtime.grid import CooccurrenceWeights, running_sum
from runtime.marginals import TopK, check_logits, head_topk, heads_topk
from runtime.native import AVAILABLE, MAX_EXTRA, NativeVerifier
from runtime.stages import VERIFY_STAGES, check_implements
from runtime.tokensets import ExtendedTokens, Generated, TokenSet, mask_and_extra, token_set

MARGINAL = 1  # a draft's `order` when no co-occurrence weight applied


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # drafted tokens, in order
    dists: tuple[TopK, ...]  # the normalised distribution each was drawn from (q)
    orders: tuple[int, ...] = ()  # the n-gram order whose weights shaped each q (MARGINAL: none)
    q: tuple[np.ndarray, np.ndarray] | None = (
        None  # compiled drafts: q's (m, k) ids and probs; dists are rows
    )


@dataclass(frozen=True)
class Verified:
    tokens: tuple[int, ...]  # accepted drafts, then one corrected or bonus token
    accepted: int  # number of drafts accepted


def ar_distribution(logits_row: np.ndarray, generated: Generated, config: SamplingConfig) -> TopK:
    """The normalised distribution `sample_ar` draws from (top-k, temperature, penalty)."""
    return _normalised(head_topk(logits_row, config.top_k, config.temperature or 1.0), generated, config)


def _normalised(top: TopK, generated: Generated, config: SamplingConfig) -> TopK:
    return _normalise(top.ids, penalised(top, token_set(generated), config))


def _normalise(ids: np.ndarray, weights: np.ndarray) -> TopK:
    """weights over their running sum (the order the compiled kernel adds in)."""
    return TopK(ids, weights / running_sum(weights))


def draft_distribution(
    top: TopK,
    prefix: Sequence[int],
    generated: TokenSet,
    masks: CooccurrenceWeights | None,
    config: SamplingConfig,
) -> tuple[TopK, int]:
    """(q, order) for a draft head's candidates `top` after the fixed tokens `prefix`.

    q(c) = f(c) * W(s, c) ** alpha_c / penalty ** [c generated], normalised over the top-k,
    with s the longest suffix of `prefix` (up to the masks' longest order minus one) whose
    n-gram is stored for at least one candidate; order = len(s) + 1, or MARGINAL (W = 1)
    where no suffix is, or alpha_c = 0, or there are no masks.
    """
    weights, order = top.probs, MARGINAL
    if masks is not None and config.alpha_c > 0:
        for length in range(min(len(prefix), max(masks.orders) - 1), 0, -1):
            if length + 1 not in masks.orders:
                continue
            cells, found = masks.hits([np.array([t], dtype=np.int64) for t in prefix[-length:]] + [top.ids])
            if not cells.size:
                continue
            if config.alpha_c != 1:  # in float64: masks store float32
                found = np.power(found, config.alpha_c, dtype=np.float64)
            weighted = np.zeros(top.ids.size)
            weighted[cells] = top.probs[cells] * found
            if running_sum(weighted) > 0:  # (not every weighted candidate underflowed)
                weights, order = weighted, length + 1
                break
    return _normalise(top.ids, penalised(TopK(top.ids, weights), generated, config)), order


def draft_tokens(
    head_logits: np.ndarray,
    after: int,
    generated: Generated,
    masks: CooccurrenceWeights | None,
    config: SamplingConfig,
    rng: np.random.Generator,
) -> Draft:
    """One draft per row of `head_logits` (heads 2..n at the position before `after`, the token
    head 1 just chose), each drawn from `draft_distribution` after `after` and the earlier
    drafts, which also count as generated for the penalty; greedy drafts take q's argmax."""
    head_logits = check_logits(head_logits)
    context = token_set(generated)
    tokens: list[int] = []
    dists, orders = [], []
    # Every head's top-k in one call: the weights and the penalty, which depend on the earlier
    # drafts, come after.
    for top in heads_topk(head_logits, config.top_k, config.temperature or 1.0):
        prefix = [after, *tokens]
        dist, order = draft_distribution(top, prefix, ExtendedTokens(context, prefix), masks, config)
        tokens.append(int(dist.ids[draw(dist.probs, config.greedy, rng)]))
        dists.append(dist)
        orders.append(order)
    return Draft(tuple(tokens), tuple(dists), tuple(orders))


def verify_drafts(
    head1_logits: np.ndarray,
    draft: Draft,
    generated: Generated,
    config: SamplingConfig,
    rng: np.random.Generator,
) -> Verified:
    """Check `draft` against head 1 at the fed positions; `head1_logits` row j predicts draft j
    (row m, after the last draft, gives the bonus token). `generated` ends just before the drafts.

    Sampling: accept draft x with probability min(1, p(x) / q(x)) (one rng.random()); on the
    first rejection draw from norm(max(0, p - q)) and stop; if all pass, draw the bonus token
    with `sample_ar`. Greedy: accept while head 1's greedy token equals the draft, then emit
    head 1's greedy token -- the tokens greedy `ar` would produce.
    """
    head1_logits = check_logits(head1_logits)
    m = len(draft.tokens)
    if head1_logits.shape[0] != m + 1 or len(draft.dists) != m:
        raise SamplingError(
            f"{m} drafts need {m + 1} rows of head-1 logits and {m} draft distributions, "
            f"got {head1_logits.shape[0]} rows and {len(draft.dists)} distributions"
        )
    generated = token_set(generated)
    temperature = config.temperature or 1.0
    for j, (token, q) in enumerate(zip(draft.tokens, draft.dists, strict=True)):
        # Head 1's top-k at a fed position only once the drafts before it passed: most passes
        # reject the first draft, and each row costs as much as the whole rest of the check.
        top = head_topk(head1_logits[j], config.top_k, temperature)
        context = ExtendedTokens(generated, draft.tokens[:j])
        if config.greedy:
            target = draw_head1(top, context, config, rng)
            if target != token:
                return Verified((*draft.tokens[:j], target), j)
        else:
            p = _normalised(top, context, config)
            q_x = _prob(q, token)
            if q_x <= 0:
                raise SamplingError(f"draft token {token} has probability 0 under its own draft distribution")
            if rng.random() >= _prob(p, token) / q_x:
                return Verified((*draft.tokens[:j], draw_residual(p, q, rng)), j)
    bonus = draw_head1(
        head_topk(head1_logits[m], config.top_k, temperature),
        ExtendedTokens(generated, draft.tokens),
        config,
        rng,
    )
    return Verified((*draft.tokens, bonus), m)


def _prob(dist: TopK, token: int) -> float:
    hit = np.flatnonzero(dist.ids == token)
    return float(dist.probs[hit[0]]) if hit.size else 0.0


def draw_residual(p: TopK, q: TopK, rng: np.random.Generator) -> int:
    """A token from norm(max(0, p - q)), one rng.random(), over token ids in ascending order.

    If rounding leaves no residual mass (p <= q everywhere, where rejection has probability 0),
    draw from p, the residual's limit. Outside p's candidates the residual is 0, and zeros
    change neither a running sum nor the first entry above a target: the draw over p's
    candidates, in ascending id order, picks the token the whole vocabulary would.
    """
    order = np.argsort(p.ids)
    ids, p_probs = p.ids[order], p.probs[order]
    q_order = np.argsort(q.ids)
    at = q_order[np.minimum(np.searchsorted(q.ids, ids, sorter=q_order), q.ids.size - 1)]
    q_probs = np.where(q.ids[at] == ids, q.probs[at], 0.0)  # q at p's candidates, 0 off q's
    residual = np.maximum(p_probs - q_probs, 0.0)
    if not residual.any():
        residual = p_probs
    return int(ids[draw(residual, False, rng)])


NUMPY_STAGES = {"draft": draft_tokens, "check": verify_drafts, "residual": draw_residual}


class Verifier:
    """verify mode's stages for one stream: in one kernel call each for the drafts and the check
    where runtime/native.py covers the settings, else the numpy functions above, to the same bits
    (not thread-safe: the kernel keeps its scratch)."""

    def __init__(self, use_native: bool = True) -> None:
        self._native = NativeVerifier() if use_native and AVAILABLE else None

    def draft(
        self,
        head_logits: np.ndarray,
        after: int,
        generated: Generated,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
        rng: np.random.Generator,
    ) -> Draft:
        """`draft_tokens`: heads 2..n's drafts after `after`."""
        head_logits = check_logits(head_logits)
        n, vocab = head_logits.shape
        k = min(config.top_k, vocab)
        if self._native is not None and self._native.ready(masks, config, n, k, vocab):
            mask, extra = mask_and_extra(generated, vocab)
            found = (
                self._native.draft(head_logits, after, mask, extra, rng) if extra.size <= MAX_EXTRA else None
            )
            if found is not None:
                tokens, orders, ids, probs = found
                dists = tuple(TopK(i, p) for i, p in zip(ids, probs, strict=True))
                return Draft(tokens, dists, orders, (ids, probs))
        return draft_tokens(head_logits, after, generated, masks, config, rng)

    def check(
        self,
        head1_logits: np.ndarray,
        draft: Draft,
        generated: Generated,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
        rng: np.random.Generator,
    ) -> Verified:
        """`verify_drafts`: head 1's rows against the drafts."""
        head1_logits = check_logits(head1_logits)
        m, vocab = len(draft.tokens), head1_logits.shape[1]
        k = min(config.top_k, vocab)
        if (
            self._native is not None
            and m
            and head1_logits.shape[0] == m + 1
            and self._native.ready(masks, config, m, k, vocab)
        ):
            q_ids, q_probs = _q_arrays(draft, k)
            mask, extra = mask_and_extra(generated, vocab)
            found = None
            if q_ids is not None and extra.size <= MAX_EXTRA:
                found = self._native.check(
                    head1_logits, np.asarray(draft.tokens, dtype=np.int64), q_ids, q_probs, mask, extra, rng
                )
            if found is not None:
                return Verified(*found)
        return verify_drafts(head1_logits, draft, generated, config, rng)


def _q_arrays(draft: Draft, k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The drafts' q as contiguous (m, k) int64 ids and float64 probs: the kernel's own arrays when
    they are whole, else stacked; (None, None) when a q does not hold k candidates."""
    m = len(draft.tokens)
    if draft.q is not None and draft.q[0].shape == (m, k):
        return draft.q
    if any(q.ids.size != k for q in draft.dists):
        return None, None
    ids = np.stack([q.ids for q in draft.dists]).astype(np.int64, copy=False)
    return ids, np.stack([q.probs for q in draft.dists]).astype(np.float64, copy=False)


check_implements("runtime/verify.py", NUMPY_STAGES, VERIFY_STAGES)
