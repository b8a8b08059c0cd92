"""The already generated tokens, as the repetition penalty asks about them: "is this id in the set?".

A decoder adds 1-3 tokens a pass, and the sampler asks about ~150 candidate ids a
step, so the set a decoder keeps is a membership mask over the vocabulary
(`SeenTokens`); a plain history from any other caller is sorted once per call
(`SortedTokens`); drafts not yet accepted ride on top of either without a copy
(`ExtendedTokens`). Every sampler function that takes `generated` takes any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SeenTokens:
    """The generated ids as a membership mask over the vocabulary, for a caller that generates
    token by token: it adds each accepted token once, where a plain history would be sorted
    again every step."""

    def __init__(self, vocab_size: int) -> None:
        self.mask = np.zeros(vocab_size, dtype=bool)
        self.any = False

    def add(self, tokens: Sequence[int]) -> None:
        for token in tokens:  # 1-3 a pass: item assignment beats building an index array
            self.mask[token] = True
            self.any = True

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """ids in the set, elementwise (ids must lie in the vocabulary)."""
        return self.mask[ids]


class SortedTokens:
    """Any other `generated`, sorted once per call: membership by binary search, far cheaper than np.isin."""

    def __init__(self, generated: Sequence[int] | np.ndarray) -> None:
        self.ids = np.sort(np.asarray(generated, dtype=np.int64))
        self.any = self.ids.size > 0

    def contains(self, ids: np.ndarray) -> np.ndarray:
        if not self.any:
            return np.zeros(ids.shape, dtype=bool)
        found = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
        return self.ids[found] == ids


class ExtendedTokens:
    """A token set and a few more ids (drafts not yet accepted) as one set, without copying it."""

    def __init__(self, base: TokenSet, extra: Sequence[int]) -> None:
        self.base = base
        self.extra = tuple(int(t) for t in extra)
        self.any = base.any or bool(self.extra)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        found = self.base.contains(ids)
        for token in self.extra:
            found = found | (ids == token)
        return found


TokenSet = SeenTokens | SortedTokens | ExtendedTokens
Generated = Sequence[int] | np.ndarray | TokenSet


def token_set(generated: Generated) -> TokenSet:
    """`generated` as a set the sampler can ask: itself if it is one, else sorted once."""
    if isinstance(generated, (SeenTokens, SortedTokens, ExtendedTokens)):
        return generated
    return SortedTokens(generated)


def tokens_plus(generated: Generated, extra: Sequence[int]) -> ExtendedTokens:
    """`generated` and the ids in `extra`, as a set the sampler takes wherever it takes `generated`."""
    return ExtendedTokens(token_set(generated), extra)


def mask_and_extra(generated: Generated, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """`generated` as a (vocab,) bool mask and an int64 array of more ids (what the compiled
    verify stages read): a decoder's set plus a few tokens without copying its mask."""
    extra: list[int] = []
    while isinstance(generated, ExtendedTokens):
        extra.extend(generated.extra)
        generated = generated.base
    return seen_mask(generated, vocab), np.array([t for t in extra if 0 <= t < vocab], dtype=np.int64)


def seen_mask(generated: Generated, vocab: int) -> np.ndarray:
    """`generated` as a (vocab,) bool membership mask (what the compiled kernel reads)."""
    if isinstance(generated, SeenTokens):
        return generated.mask
    if isinstance(generated, ExtendedTokens):
        mask = seen_mask(generated.base, vocab).copy()
        mask[[t for t in generated.extra if 0 <= t < vocab]] = True
        return mask
    ids = generated.ids if isinstance(generated, SortedTokens) else np.asarray(generated, dtype=np.int64)
    mask = np.zeros(vocab, dtype=bool)
    mask[ids[(ids >= 0) & (ids < vocab)]] = True  # ids outside the vocabulary are no candidate's
    return mask
