"""The `verify` sampler: speculative sampling with head 1 as the judge (beyond the paper).

    draft:    heads 2..n draft the tokens after the one head 1 just chose
    check:    head 1, at the fed positions, accepts draft x with probability min(1, p(x) / q(x))
    residual: at the first rejection, one token from norm(max(0, p - q)) ends the pass

The emitted tokens are distributed exactly as `ar` sampling from head 1 gives them, for
any draft distribution q that is known; docs/METHOD.md says which q the drafts use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime import draws
from runtime.config import SamplingConfig
from runtime.errors import SamplingError
from runtime.marginals import TopK, check_logits, head_topk, heads_topk
from runtime.stages import VERIFY_STAGES, check_implements
from runtime.tokensets import ExtendedTokens, Generated, token_set


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # drafted tokens, in order
    dists: tuple[TopK, ...]  # the normalised distribution each was drawn from (q)


@dataclass(frozen=True)
class Verified:
    tokens: tuple[int, ...]  # accepted drafts, then one corrected or bonus token
    accepted: int  # number of drafts accepted


def ar_distribution(logits_row: np.ndarray, generated: Generated, config: SamplingConfig) -> TopK:
    """The normalised distribution `sample_ar` draws from (top-k, temperature, penalty)."""
    return _normalised(head_topk(logits_row, config.top_k, config.temperature or 1.0), generated, config)


def _normalised(top: TopK, generated: Generated, config: SamplingConfig) -> TopK:
    weights = draws.penalised(top, token_set(generated), config)
    return TopK(top.ids, weights / weights.sum())


def draft_tokens(
    head_logits: np.ndarray,
    generated: Generated,
    config: SamplingConfig,
    rng: np.random.Generator,
) -> Draft:
    """One draft per row of `head_logits` (heads 2..n at one position), each drawn from its head's
    `ar_distribution` with the earlier drafts counted as generated; greedy drafts take the argmax."""
    head_logits = check_logits(head_logits)
    context = token_set(generated)
    tokens, dists = [], []
    # Every head's top-k in one call: the penalty, which depends on the earlier drafts, comes after.
    for top in heads_topk(head_logits, config.top_k, config.temperature or 1.0):
        dist = _normalised(top, ExtendedTokens(context, tokens), config)
        token = int(dist.ids[draws.draw(dist.probs, config.greedy, rng)])
        tokens.append(token)
        dists.append(dist)
    return Draft(tuple(tokens), tuple(dists))


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
            target = draws.draw_head1(top, context, config, rng)
            if target != token:
                return Verified((*draft.tokens[:j], target), j)
        else:
            p = _normalised(top, context, config)
            q_x = _prob(q, token)
            if q_x <= 0:
                raise SamplingError(f"draft token {token} has probability 0 under its own draft distribution")
            if rng.random() >= _prob(p, token) / q_x:
                return Verified((*draft.tokens[:j], draw_residual(p, q, rng)), j)
    bonus = draws.draw_head1(
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
    return int(ids[draws.draw(residual, False, rng)])


NUMPY_STAGES = {"draft": draft_tokens, "check": verify_drafts, "residual": draw_residual}
check_implements("runtime/verify.py", NUMPY_STAGES, VERIFY_STAGES)
