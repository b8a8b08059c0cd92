"""The decoding loop: one forward pass per step, 1..n tokens accepted per pass.

Modes (runtime/config.py):
- ar: head 1 alone, one token per pass -- the baseline on the same artifact.
- dynamic: Algorithm 1 (runtime/dynamic.py) at the last fed position; every
  emitted token is fed in the next pass at once through the KV cache.
- verify: heads 2..n draft the tokens after the one head 1 just chose; the next
  pass feeds [chosen, drafts...] and head 1 checks every draft at its position
  with speculative-sampling acceptance, so the output is distributed exactly as
  `ar`'s. Slots of rejected drafts stay in the cache, masked out, until they
  are an eighth of it; then one copy drops them (GraphSession.compact).

`Decoder.run()` yields the tokens each pass accepts, so `generate` and
`stream` share one code path. Timings split every pass into ONNX Runtime time
and sampling time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from runtime.config import SamplingConfig
from runtime.draws import sample_ar
from runtime.dynamic import DynamicSampler
from runtime.errors import GenerationTimeout
from runtime.session import Deadline, GraphSession
from runtime.stats import GenerationStats
from runtime.tokensets import SeenTokens, tokens_plus
from runtime.verify import Draft, Verifier

# Verify leaves ~1 masked slot per pass. Dropping them costs one copy of the cache; keeping them
# costs every later pass. On the reference model (1 thread, benchmarks/bench_cache_compaction.py)
# compacting once they are an eighth of the cache gave verify 1.01x the tokens/s of never doing
# it at 64 new tokens, 1.08x at 256, 1.11x at 512.
COMPACT_SHARE = 8  # compact when dead slots >= slots / COMPACT_SHARE ...
COMPACT_MIN_DEAD = 4  # ... and at least this many


class Decoder:
    """One generation stream: its own cache, random state and stats over a shared session."""

    def __init__(
        self,
        session: GraphSession,
        masks,
        config: SamplingConfig,
        seed: int | None,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        deadline: Deadline,
    ):
        self.session = session
        self.masks = masks
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.deadline = deadline
        self.sampler = DynamicSampler()
        self.verifier = Verifier()
        self.cache = session.empty_cache()
        self.context_length = session.manifest.model.context_length
        self.n_heads = session.manifest.model.num_token_heads
        self.generated: list[int] = []
        self.seen = SeenTokens(session.manifest.model.vocab_size)  # the same ids, for the penalty
        self.next_position = 0  # position of the next fed token (rejected drafts do not count)
        self.to_feed: list[int] = []  # accepted tokens not yet through the graph
        self.draft: Draft | None = None  # verify: drafts for the tokens after to_feed
        self.stats = GenerationStats()

    def run(self, prompt: list[int]) -> Iterator[list[int]]:
        """Yield the tokens each pass accepts (after stop and length cuts) until done."""
        self.stats.prompt_tokens = len(prompt)
        start = time.perf_counter()
        logits = self._forward(prompt, last_only=True)  # (n_heads, 1, V)
        tokens = self._first_choice(logits[:, -1])
        accepted = self._accept(tokens)
        self.stats.prefill_s = time.perf_counter() - start
        self.stats.first_pass_tokens = len(accepted)
        self._check_deadline()
        yield accepted
        while not self.stats.stop_reason:
            self._check_deadline()
            pass_start = time.perf_counter()
            feed = self._next_feed()
            if not feed:
                self.stats.stop_reason = "context"
                break
            ort_start = time.perf_counter()
            # verify checks a draft at every fed position; the other modes sample at the last
            logits = self._forward(feed, last_only=self.config.mode != "verify")
            sample_start = time.perf_counter()
            tokens = (
                self._verify(logits, feed) if self.config.mode == "verify" else self._choose(logits[:, -1])
            )
            accepted = self._accept(tokens)
            done = time.perf_counter()
            self.stats.decode_ort_s += sample_start - ort_start
            self.stats.decode_sampling_s += done - sample_start
            self.stats.decode_s += done - pass_start
            yield accepted

    def _check_deadline(self) -> None:
        if self.deadline.expired:
            raise GenerationTimeout("generation ran past its time limit and was stopped")

    def stop(self) -> None:
        """End the stream after the current pass (a stop string matched in the text)."""
        self.stats.stop_reason = "stop"

    def _next_feed(self) -> list[int]:
        """What the next pass feeds; drafts are cut to fit the context, [] when nothing fits."""
        room = self.context_length - self.next_position
        if len(self.to_feed) > room:
            return []
        if self.config.mode == "verify" and self.draft is not None:
            keep = min(len(self.draft.tokens), room - len(self.to_feed))
            if keep < len(self.draft.tokens):
                self.draft = Draft(
                    self.draft.tokens[:keep], self.draft.dists[:keep], self.draft.orders[:keep]
                )
            return [*self.to_feed, *self.draft.tokens]
        return list(self.to_feed)

    def _forward(self, tokens: list[int], last_only: bool) -> np.ndarray:
        positions = list(range(self.next_position, self.next_position + len(tokens)))
        logits = self.session.forward(self.cache, tokens, positions, self.deadline.run_options, last_only)
        self.next_position += len(tokens)
        self.stats.forward_passes += 1
        return logits

    def _first_choice(self, last: np.ndarray) -> list[int]:
        """The prefill pass's tokens; in verify mode it also drafts the ones after them."""
        if self.config.mode != "verify":
            return self._choose(last)
        token = sample_ar(last[0], self.seen, self.config, self.rng)
        self.draft = self._draft(last, [token])
        return [token]

    def _choose(self, last: np.ndarray) -> list[int]:
        if self.config.mode == "ar" or self.n_heads == 1:
            return [sample_ar(last[0], self.seen, self.config, self.rng)]
        result = self.sampler.step(last, self.seen, self.masks, self.config, self.rng)
        self.stats.backoffs += result.backoffs
        return list(result.tokens)

    def _draft(self, last: np.ndarray, emitted: list[int]) -> Draft | None:
        """Drafts from heads 2..n at the position before the last of `emitted`, which they follow."""
        if self.n_heads == 1:
            return None
        draft = self.verifier.draft(
            last[1:], emitted[-1], tokens_plus(self.seen, emitted), self.masks, self.config, self.rng
        )
        for order in draft.orders:
            self.stats.draft_orders[order] = self.stats.draft_orders.get(order, 0) + 1
        return draft

    def _verify(self, logits: np.ndarray, feed: list[int]) -> list[int]:
        """Check the drafts fed after the last accepted token; mask the slots of rejected ones."""
        draft = self.draft
        if draft is None or not draft.tokens:
            token = sample_ar(logits[0, -1], self.seen, self.config, self.rng)
            self.draft = self._draft(logits[:, -1], [token])
            return [token]
        first = len(feed) - len(draft.tokens) - 1  # row of head 1 that predicts the first draft
        verdict = self.verifier.check(logits[0, first:], draft, self.seen, self.masks, self.config, self.rng)
        self.stats.record_check(len(draft.tokens), verdict.accepted)
        rejected = len(draft.tokens) - verdict.accepted
        if rejected:
            self.cache.live[-rejected:] = bytes(rejected)
            self.next_position -= rejected
            dead = self.cache.slots - self.next_position
            if dead >= COMPACT_MIN_DEAD and dead * COMPACT_SHARE >= self.cache.slots:
                self.session.compact(self.cache)
        self.draft = self._draft(logits[:, first + verdict.accepted], list(verdict.tokens))
        return list(verdict.tokens)

    def _accept(self, tokens: list[int]) -> list[int]:
        """Cut at a stop token or the length budget; record the emission; queue what to feed next."""
        self.stats.emissions[len(tokens)] = self.stats.emissions.get(len(tokens), 0) + 1
        kept = []
        for token in tokens:
            if token in self.stop_ids:
                self.stats.stop_reason = "stop"
                break
            kept.append(token)
            if len(self.generated) + len(kept) >= self.max_new_tokens:
                self.stats.stop_reason = "max_new_tokens"
                break
        self.generated.extend(kept)
        self.seen.add(kept)
        self.stats.new_tokens = len(self.generated)
        # verify feeds the newest token followed by its drafts; ar/dynamic feed all accepted tokens.
        self.to_feed = kept[-1:] if self.config.mode == "verify" else kept
        return kept
