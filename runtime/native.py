"""The compiled sampler kernel (runtime/_native.c, _stages.c, _marginals.c) behind numpy-shaped
calls: a whole weighted dynamic step from the heads' logits, the weighted joint alone, and the
heads' marginals (top-k and softmax) for the other modes.

`pip install` builds the C file as an optional extension: where no compiler is at
hand the install still succeeds, `AVAILABLE` is False, and the sampler keeps to its
numpy path, which computes the very same numbers (tests/test_native.py holds the two
equal bit for bit, and both to the whole-grid definition). DYNAMO_NATIVE=0 in the
environment turns the kernel off.

The kernel has one C function per stage of runtime/stages.py (runtime/_stages.c); which
settings it covers is each stage's `kernel` predicate there: the paper's defaults and their
neighbours, co-occurrence weights with alpha_c = 1 over 2- or 3-token grids, any static
threshold, Otsu on or off, blur 0, 1 or 3. Anything else (alpha_c != 1 needs numpy's pow,
wider blurs scipy's correlate1d rounding) goes the numpy way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from runtime.config import SamplingConfig
from runtime.errors import SamplingError
from runtime.stages import DYNAMIC_STAGES, GRID_STAGES, VERIFY_STAGES, check_implements, kernel_covers

if os.environ.get("DYNAMO_NATIVE", "1") == "0":  # opt out, e.g. to compare the two paths
    _native = None
else:
    try:
        import runtime._native as _native
    except ImportError:  # built without a C compiler: the numpy path serves
        _native = None

AVAILABLE = _native is not None
if _native is not None:  # the kernel's stage functions, in the list's order (runtime/_stages.h)
    check_implements("runtime/_stages.c", dict.fromkeys(_native.STAGES), DYNAMIC_STAGES)
    check_implements("runtime/_stages.c", dict.fromkeys(_native.VERIFY_STAGES), VERIFY_STAGES)
UNUSABLE_LOGITS = "logits contain NaN or +inf; the model output is unusable"
# Grids above this many cells (top_k > 128 at three heads) take the numpy path: the
# kernel's scratch is 8 words and a byte per cell.
MAX_CELLS = 1 << 21


class CsrTables(NamedTuple):
    """The co-occurrence CSR arrays the kernel reads (pair rows = tokens, triple rows = pair entries)."""

    pair_indptr: np.ndarray  # (V + 1,) int64
    pair_indices: np.ndarray  # (P,) uint16 where the vocabulary fits, else int32
    pair_values: np.ndarray  # (P,) float32
    triple_indptr: np.ndarray  # (P + 1,) int64, or (1,) without triples
    triple_indices: np.ndarray  # (T,) as pair_indices
    triple_values: np.ndarray  # (T,) float32


def supports_step(masks, config: SamplingConfig, n_heads: int, k: int) -> bool:
    """Whether one kernel call can do a whole step: weights at every n >= 2, every stage covered."""
    return (
        n_heads >= 2
        and hasattr(masks, "csr_tables")
        and kernel_covers(DYNAMIC_STAGES, config)
        and all(n in masks.orders and supports_grid(n, k**n, config) for n in range(2, n_heads + 1))
    )


# The grid call (`NativeSampler.joint`) does these stages of a weighted grid, in order.
GRID_CALL = GRID_STAGES[: GRID_STAGES.index("adaptive_threshold") + 1]
_GRID_CALL_STAGES = tuple(s for s in DYNAMIC_STAGES if s.name in GRID_CALL)


def supports_grid(order: int, cells: int, config: SamplingConfig) -> bool:
    """Whether the kernel's grid call computes a weighted joint of `order` heads and `cells` cells."""
    return AVAILABLE and order in (2, 3) and cells <= MAX_CELLS and kernel_covers(_GRID_CALL_STAGES, config)


def marginals(logits: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's k best ids by (-logit, id), (rows, k) int64, and softmax(logits / temperature)
    there, (rows, k) float64, as runtime/marginals.py defines them; None where the kernel does
    not read the logits (`reads`). Raises SamplingError for a row with a NaN or an infinite maximum.
    """
    assert _native is not None
    if not reads(logits):
        return None
    ids = np.empty((logits.shape[0], k), dtype=np.int64)
    probs = np.empty((logits.shape[0], k), dtype=np.float64)
    if not _native.marginals(logits, k, float(temperature), ids, probs):
        raise SamplingError(UNUSABLE_LOGITS)
    return ids, probs


def reads(logits: np.ndarray) -> bool:
    """Whether the kernel reads these (heads, vocab) logits in place: float32 rows of unit stride,
    a non-negative whole number of floats apart (logits[:, -1] of a (heads, T, vocab) output is)."""
    strides = logits.strides
    return (
        logits.dtype == np.float32
        and logits.ndim == 2
        and strides[1] == 4
        and strides[0] >= 0
        and strides[0] % 4 == 0
        and (logits.shape[0] == 1 or strides[0] >= 4 * logits.shape[1])
    )


class NativeSampler:
    """The kernel's scratch for one sampler (not thread-safe, like the sampler itself).

    A whole step goes through a `_native.Stepper` built for the last masks, heads and k and
    configured for the last config: it holds the tables and its own scratch, so a step
    passes only the logits, the seen mask and the random source. `joint` alone keeps its
    scratch here.
    """

    def __init__(self) -> None:
        self._rank = np.empty(0, dtype=np.int32)
        self._cells = np.empty(0, dtype=np.int64)
        self._values = np.empty(0, dtype=np.float64)
        self._work = np.empty(0, dtype=np.float64)  # (3 * cells,): a zero grid, then two pass grids
        self._iwork = np.empty(0, dtype=np.int64)  # (5 * cells,): cell lists
        self._flags = np.empty(0, dtype=np.uint8)  # (cells,): all 0 between calls
        # The pair entry ids of a k1 x k2 grid of candidates, for a 3 -> 2 back-off or a next call
        # with the same candidates; the two id lists, concatenated; the grid's shape; and the pair
        # table they come from (held, not its id, which could be reused), None when not valid.
        self._pair_grid = np.empty(0, dtype=np.int64)
        self._pair_ids = np.empty(0, dtype=np.int64)
        self._pair_shape = (0, 0)
        self._pair_table: np.ndarray | None = None
        # can_step's last question and its answer; the Stepper for (masks, heads, k), which keeps
        # its scratch when only the config changes, and what it was built for
        self._plan: tuple = (None, None, 0, 0, False)
        self._stepper = None
        self._stepper_for: tuple = (None, 0, 0)

    def can_step(self, masks, config: SamplingConfig, n_heads: int, k: int) -> bool:
        """`supports_step`, remembered for the last masks and config (a generation asks every pass);
        when it says yes, the Stepper is configured for this config."""
        last_masks, last_config, last_heads, last_k, answer = self._plan
        if masks is last_masks and n_heads == last_heads and k == last_k:
            if config is last_config:
                return answer
            if config == last_config:  # an equal config of a new generation: same plan
                self._plan = (masks, config, n_heads, k, answer)
                return answer
        answer = supports_step(masks, config, n_heads, k)
        if answer:
            built_masks, built_heads, built_k = self._stepper_for
            if not (masks is built_masks and n_heads == built_heads and k == built_k):
                self._stepper = _native.Stepper(k, n_heads, *masks.csr_tables())
                self._stepper_for = (masks, n_heads, k)
            self._stepper.configure(
                # bounds[n] = eps_b ** (n - 1), as the numpy path computes it
                np.array([config.eps_b ** (m - 1) if m else 0.0 for m in range(n_heads + 1)]),
                float(config.temperature or 1.0),
                float(config.static_threshold),
                float(config.repetition_penalty),
                int(config.adaptive),
                int(config.blur),
                int(config.greedy),
            )
        self._plan = (masks, config, n_heads, k, answer)
        return answer

    def joint(
        self,
        ids: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        tables: CsrTables,
        mass: float,
        bound: float,
        static_threshold: float,
        adaptive: bool,
        blur: int,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(ascending cell ids, J there) after weighting, static threshold and Otsu; None if
        min(max J, 1) <= bound once weighted (the numpy path's early back-off).

        `ids` must be distinct within each axis (top-k lists are).
        """
        assert _native is not None
        shape = tuple(int(x.size) for x in ids)
        pair_ids = np.concatenate(ids[:2]).astype(np.int64, copy=False)
        self._grow(math.prod(shape), shape[:2], tables)
        reuse = self._holds_pairs(tables, shape[:2]) and np.array_equal(pair_ids, self._pair_ids)
        self._pair_table = None  # until the coming call succeeds
        count = _native.joint(
            shape,
            np.concatenate(ids).astype(np.int64, copy=False),
            np.concatenate(probs).astype(np.float64, copy=False),
            *tables,
            self._rank,
            float(mass),
            float(bound),
            float(static_threshold),
            int(adaptive),
            int(blur),
            *self._scratch(),
            int(reuse),
        )
        self._pair_ids, self._pair_shape, self._pair_table = pair_ids, shape[:2], tables.pair_indices
        if count < 0:
            return None
        return self._cells[:count].copy(), self._values[:count].copy()

    def step(self, logits: np.ndarray, seen: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
        """The tokens one pass emits: DynamicSampler.step with co-occurrence weights at every n,
        in one call, from the heads' logits (n_heads or more rows of (rows, vocab), heads 1..n first)
        and the (vocab,) bool mask of generated tokens, for the plan the last `can_step` said yes
        to. None where the kernel does not read the logits (`reads`). Raises SamplingError for
        unusable logits.
        """
        tokens = self._stepper.step(_readable(logits), seen, rng.random)
        if tokens is NotImplemented:
            return None
        if tokens is None:
            raise SamplingError(UNUSABLE_LOGITS)
        return tokens

    def _holds_pairs(self, tables: CsrTables, shape: tuple[int, int]) -> bool:
        """Whether the pair grid holds a `shape` grid of _pair_ids' pairs from these tables."""
        return tables.pair_indices is self._pair_table and shape == self._pair_shape

    def _grow(self, size: int, pair_shape: tuple[int, int], tables: CsrTables) -> None:
        """Scratch for a grid of `size` cells and `pair_shape` pairs; the rank table for the vocabulary."""
        vocab = tables.pair_indptr.size - 1
        if self._rank.size != vocab:
            self._rank = np.full(vocab, -1, dtype=np.int32)  # the kernel restores every slot it sets
        if self._cells.size < size:
            self._cells = np.empty(size, dtype=np.int64)
            self._values = np.empty(size, dtype=np.float64)
            self._work = np.zeros(3 * size, dtype=np.float64)
            self._iwork = np.empty(5 * size, dtype=np.int64)
            self._flags = np.zeros(size, dtype=np.uint8)
        if self._pair_grid.size < pair_shape[0] * pair_shape[1]:
            self._pair_grid = np.empty(pair_shape[0] * pair_shape[1], dtype=np.int64)
            self._pair_table = None

    def _scratch(self) -> tuple[np.ndarray, ...]:
        return self._cells, self._values, self._work, self._iwork, self._flags, self._pair_grid


_MAX_DRAFTS = 3  # the kernel's MAX_ORDER: heads 2..4
MAX_EXTRA = 64  # generated tokens a verify call takes beside the mask (runtime/_stages.h)


class NativeVerifier:
    """The kernel's verify stages for one stream (`_native.Verifier`: draft, check, residual in C,
    to the bits of runtime/verify.py's numpy functions), built for the last masks, drafts and k."""

    def __init__(self) -> None:
        self._verifier = None
        self._built_for: tuple = (None, 0, 0)
        self._config: SamplingConfig | None = None

    def ready(self, masks, config: SamplingConfig, n_drafts: int, k: int, vocab: int) -> bool:
        """Whether the kernel covers these drafts (configuring it for `config` when it does)."""
        if config is self._config and self._built_for == (masks, k, vocab) and 1 <= n_drafts <= _MAX_DRAFTS:
            return True  # a stream asks every pass with the same config and masks
        if not (
            AVAILABLE
            and 1 <= n_drafts <= _MAX_DRAFTS
            and (masks is None or (hasattr(masks, "csr_tables") and kernel_covers(VERIFY_STAGES, config)))
        ):
            return False
        if self._built_for != (masks, k, vocab):
            tables = masks.csr_tables() if masks is not None else _no_tables(vocab)
            self._verifier = _native.Verifier(k, _MAX_DRAFTS, *tables)
            self._built_for, self._config = (masks, k, vocab), None
        if config != self._config:
            weighted = masks is not None and config.alpha_c == 1
            self._verifier.configure(
                float(config.temperature or 1.0),
                float(config.repetition_penalty),
                int(weighted),
                int(config.greedy),
            )
            self._config = config
        return True

    def draft(
        self, logits: np.ndarray, after: int, seen: np.ndarray, extra: np.ndarray, rng: np.random.Generator
    ):
        """(tokens, orders, q_ids, q_probs) for the draft rows `logits`; None for logits it does not read."""
        k = self._built_for[1]
        q_ids = np.empty((logits.shape[0], k), dtype=np.int64)
        q_probs = np.empty((logits.shape[0], k), dtype=np.float64)
        found = self._verifier.draft(_readable(logits), int(after), seen, extra, rng.random, q_ids, q_probs)
        if found is NotImplemented:
            return None
        if found is None:
            raise SamplingError(UNUSABLE_LOGITS)
        return (*found, q_ids, q_probs)

    def check(
        self,
        logits: np.ndarray,
        drafts: np.ndarray,
        q_ids: np.ndarray,
        q_probs: np.ndarray,
        seen: np.ndarray,
        extra: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[tuple[int, ...], int] | None:
        """(tokens, accepted) of head 1's rows `logits` against the drafts; None for unread logits."""
        try:
            found = self._verifier.check(_readable(logits), drafts, q_ids, q_probs, seen, extra, rng.random)
        except ValueError as exc:
            if "probability 0" in str(exc):
                raise SamplingError(str(exc)) from exc
            raise
        if found is NotImplemented:
            return None
        if found is None:
            raise SamplingError(UNUSABLE_LOGITS)
        return found


def _readable(logits: np.ndarray) -> np.ndarray:
    """float16 logits as float32 (exact): the kernel reads them, to the numpy path's bits."""
    return logits.astype(np.float32) if logits.dtype == np.float16 else logits


def _no_tables(vocab: int) -> CsrTables:
    """Empty co-occurrence tables over `vocab` tokens: drafts from the marginals alone."""
    no_index, no_value = np.empty(0, np.int32), np.empty(0, np.float32)
    return CsrTables(
        np.zeros(vocab + 1, np.int64), no_index, no_value, np.zeros(1, np.int64), no_index, no_value
    )
