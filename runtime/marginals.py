"""Each head's marginals from its logits: the top-k candidates and their softmax probabilities.

f = softmax(logits / T) over the whole vocabulary, in float64 (float32 would move
probabilities by 1e-7, enough to shift Otsu bins and eps_b decisions):
    z = (logit - max logit) / T      (exact casts, one subtraction, one division)
    f = exp(z) / sum over the vocabulary of exp(z)
Two choices make every path give the same bits on every CPU:
- `exp` is a fixed polynomial (below), not np.exp: numpy's exp rounds differently on
  AVX-512 and scalar CPUs, so a seed would not give the same tokens on every machine.
- The normaliser is summed in 16 lanes (lane j takes the tokens j, j + 16, ...; each lane a
  running sum), then the lanes in order: numpy reproduces it with accumulate along an axis,
  and the compiled kernel vectorises it without reassociating anything.

runtime/_marginals.c computes the same in one call per step (where the kernel is built);
this module is its numpy twin, equal to the last bit (tests/test_native.py), and what runs
without a compiler. The twin is ~10x slower: its polynomial takes 30 ufunc calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import SamplingError
from runtime.native import AVAILABLE
from runtime.native import marginals as compiled_marginals

# exp(z) for z <= 0: 0 below EXP_FLOOR (e^-708 ~ 1e-308); else with n = round(z log2 e) (ties
# to even, via the shifter) and r = (z - n ln2_hi) - n ln2_lo, |r| <= 0.35, the Taylor
# polynomial of degree 13 in r (remainder 4e-18) times 2^n. fdlibm's split of ln 2 makes
# n * LN2_HI exact. The constants are runtime/_marginals.c's, digit for digit.
EXP_FLOOR = -708.0
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
SHIFTER = 6755399441055744.0  # 1.5 * 2 ** 52
TAYLOR = tuple(1.0 / math.factorial(i) for i in range(14))  # 1 / i!, correctly rounded like C's 1.0 / 13!
LANES = 16
# Head i's top-k is searched among the tokens at least as large as the k-th largest
# of the maxima of _TOPK_GROUPS groups of logits: exact (k groups reach that value, so
# the k-th largest logit does too). Group g holds the logits g, g + G, g + 2G, ...: their
# maxima are one elementwise max over rows of a (vocab / G, G) view, which numpy
# vectorises; over 10x cheaper than argpartition over a 50k vocabulary.
_TOPK_GROUPS = 512


def exp(z: np.ndarray) -> np.ndarray:
    """The fixed exp of float64 values z <= 0 (see the module docstring), within ~1 ulp of e^z."""
    clamped = np.maximum(z, EXP_FLOOR)
    shifted = clamped * LOG2E
    shifted += SHIFTER
    n = shifted - SHIFTER  # round to the nearest integer, ties to even
    r = clamped - n * LN2_HI
    r -= n * LN2_LO
    p = np.full_like(r, TAYLOR[13])
    for coefficient in TAYLOR[12::-1]:  # Horner, one rounding per multiply and per add
        p *= r
        p += coefficient
    out = np.ldexp(p, n.astype(np.int64))  # exact: the results are normal numbers
    out[z < EXP_FLOOR] = 0.0
    return out


def lane_totals(weights: np.ndarray) -> np.ndarray:
    """Each row's sum of (rows, vocab) non-negative `weights` in the lane order above, (rows,)."""
    rows, vocab = weights.shape
    padded = np.zeros((rows, -(-vocab // LANES) * LANES))  # zeros leave sums >= 0 unchanged
    padded[:, :vocab] = weights
    lanes = np.add.accumulate(padded.reshape(rows, -1, LANES), axis=1)[:, -1]  # (rows, LANES)
    return np.add.accumulate(lanes, axis=1)[:, -1]


@dataclass(frozen=True)
class TopK:
    """A head's candidates in grid order and their probabilities (not renormalised unless stated)."""

    ids: np.ndarray  # (k,) int64
    probs: np.ndarray  # (k,) float64


def heads_topk(logits: np.ndarray, top_k: int, temperature: float, use_native: bool = True) -> list[TopK]:
    """Each row of (heads, vocab) `logits` as a TopK: its top-k tokens (descending logit, ties by
    id) with their softmax(logits / T) probabilities. The compiled kernel does every row in one
    call where numpy takes dozens, to the same bits; `use_native=False` keeps to numpy."""
    return [
        TopK(ids, probs)
        for ids, probs in zip(*topk_arrays(logits, top_k, temperature, use_native), strict=True)
    ]


def head_topk(logits_row: np.ndarray, top_k: int, temperature: float, use_native: bool = True) -> TopK:
    """`heads_topk` of one (vocab,) row."""
    return heads_topk(np.asarray(logits_row)[None], top_k, temperature, use_native)[0]


def check_logits(logits: np.ndarray) -> np.ndarray:
    """`logits` as an array, if it is (n_heads, vocab) with both sizes at least 1."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or 0 in logits.shape:
        raise SamplingError(f"logits must be (n_heads, vocab) at one position, got shape {logits.shape}")
    return logits


def topk_arrays(
    logits: np.ndarray, top_k: int, temperature: float, use_native: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k of (heads, vocab) `logits` by (-logit, id) with f there: (heads, k) int64
    ids and (heads, k) float64 probabilities (not renormalised over the top k)."""
    logits = np.asarray(logits)
    k = min(top_k, logits.shape[1])
    if use_native and AVAILABLE:
        found = compiled_marginals(logits, k, temperature)
        if found is not None:
            return found
    tops = logits.max(axis=1)
    if not np.all(np.isfinite(tops)):
        raise unusable_logits()
    scaled = np.subtract(logits, tops[:, None], dtype=np.float64)  # exact casts, then a float64 subtraction
    scaled /= temperature
    weights = exp(scaled)
    ids = np.stack(_topk_ids(logits, k))
    return ids, np.take_along_axis(weights, ids, axis=1) / lane_totals(weights)[:, None]


def unusable_logits() -> SamplingError:
    return SamplingError("logits contain NaN or +inf; the model output is unusable")


def _topk_ids(logits: np.ndarray, k: int) -> list[np.ndarray]:
    """Each row's k best token ids by (-logit, id)."""
    heads, vocab = logits.shape
    per_group = vocab // _TOPK_GROUPS
    if per_group < 2 or k > _TOPK_GROUPS:  # a small vocabulary: search it whole
        return [_best_of(row, np.arange(vocab), k) for row in logits]
    grouped = logits[:, : per_group * _TOPK_GROUPS].reshape(heads, per_group, _TOPK_GROUPS)
    floors = np.partition(grouped.max(axis=1), _TOPK_GROUPS - k, axis=1)[:, _TOPK_GROUPS - k]  # (heads,)
    return [_best_of(row, np.flatnonzero(row >= floor), k) for row, floor in zip(logits, floors, strict=True)]


def _best_of(row: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k best of `candidates` by (-logit, id); they must include every token tied with the k-th best."""
    values = row[candidates]
    if candidates.size > 4 * k:  # narrow a long list before sorting it
        chosen = np.argpartition(values, values.size - k)[values.size - k :]
        kth = values[chosen].min()
        # argpartition picks arbitrarily among logits equal to the k-th: make it the smallest ids.
        if np.count_nonzero(values >= kth) > k:  # an unchosen logit equals the k-th
            above = chosen[values[chosen] > kth]
            equal = np.flatnonzero(values == kth)[: k - above.size]
            chosen = np.concatenate([above, equal])
        candidates, values = candidates[chosen], values[chosen]
    return candidates[np.lexsort((candidates, -values))[:k]].astype(np.int64)
