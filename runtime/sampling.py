"""The fast DynaMo sampler: Algorithm 1 of shared/DYNAMO.md, vectorised over the top-k grid.

A decoding step gets every head's logits at the last position and returns the
1..n tokens to emit. `runtime/reference.py` implements the same definition with
plain loops, and the tests hold the two equal. The definition, with every
choice the paper leaves open made explicit:

Marginals. f_i = softmax(logits_i / T) over the whole vocabulary; T = 1 when the
temperature is 0 (greedy takes the argmax of the very quantities sampling would
draw from, as transformers does), computed as runtime/marginals.py says (a fixed
exp, a fixed summation order). Head i keeps its top-k tokens ranked by
descending logit, ties by ascending token id; axis i of the grid lists them in
that order (the blur needs a fixed order, and this one keeps likely candidates
together). k is capped at the vocabulary size.

Joint over heads 1..n, for a cell c = (c_1, ..., c_n) of the grid:
    R(c) = f_1(c_1) * ... * f_n(c_n) * W(c) ** alpha_c
    J(c) = R(c) * M / sum_grid R,      M = prod_i sum_topk f_i  (= sum_grid f_1 * ... * f_n)
(the product rounded as ((f_1 f_2) ...) f_n, then times W; each sum_topk f_i is the running
sum over the top k in order, M their product head by head; sum_grid R is the running
sum over the cells in C order, which zeros leave unchanged, so a sum over the stored
n-grams alone is bit for bit the whole grid's)
W is the co-occurrence weight of the n-gram (pairs for n = 2, triples for n = 3).
Scaling to M is how the weights "redistribute mass inside the candidate grid
and do not create it": J carries exactly the probability the plain product of
marginals gives the grid, so eps_b means the same with and without masks.
Without masks, with alpha_c = 0, or when the masks hold no statistics of order
n, J is the product itself. If every cell is masked (sum R = 0), J = 0.

Static threshold: cells with J < static_threshold become 0.

Adaptive threshold (Otsu). B = J blurred along every axis with the binomial
kernel of size `blur` ([1, 2, 1] / 4 for 3, OpenCV's 3-tap Gaussian), borders
reflected without repeating the edge cell (scipy "mirror", OpenCV's default);
B = J when blur is 0 or 1. B's values fall in 256 equal bins over [min B, max B]
(skimage's default); the split is the bin boundary that maximises the
between-class variance, computed on integer bin indices with integer counts
(the variance is invariant under the affine map from index to bin centre, so
this is Otsu on bin centres, and equal scores tie exactly); the first best
split wins. Cells whose B lands in the lower class get J = 0; a constant B
keeps everything. skimage is not a dependency, and the histogram form is a
handful of vectorised lines.

Repetition penalty: J(c) is divided by penalty ** m(c), m(c) = how many of the
c_i are in `generated` -- the paper's "divide the probabilities of already
generated tokens", applied to each marginal of the product.

Decision: emit n tokens iff max J > eps_b ** (n - 1), max J clipped at 1
against rounding; otherwise back off to n - 1. The strict ">" (the paper: back
off if every entry < eps_b^(n-1); they differ only at equality) makes both ends
exact: eps_b = 0 emits n whenever J has mass (an all-zero J cannot be sampled,
so it backs off), and eps_b = 1 never emits more than one token.

Drawing: every random draw is one u = rng.random(), turned into a cell by
inverse CDF over the grid in C order: the first cell whose running sum exceeds
u * (sum of J). Greedy takes the first maximal cell and draws nothing. At n = 1
head 1 alone is used: its top-k f_1, divided by the penalty for generated
tokens -- the code path of `sample_ar`, so eps_b = 1 reproduces `ar` draw for
draw with the same Generator.

Verify mode (beyond the paper) gets speculative-sampling helpers at the end:
heads 2..n draft, head 1 accepts a draft x with probability min(1, p(x)/q(x))
and on rejection draws from norm(max(0, p - q)), which makes the emitted
tokens distributed exactly as `ar` sampling from head 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from scipy.ndimage import correlate1d

from runtime import native
from runtime.config import SamplingConfig
from runtime.errors import SamplingError
from runtime.marginals import topk_arrays

OTSU_BINS = 256
# Otsu's threshold keeps J sparse while at most 1 / _SPARSE_SHARE of the cells can leave
# its lowest bin: past that, whole-grid passes beat gathering the cells one by one.
_SPARSE_SHARE = 16


class CooccurrenceWeights(Protocol):
    """What the sampler needs from the co-occurrence masks (runtime.cooccurrence.CooccurrenceMask).

    Masks that also have `csr_tables()` (runtime.native.CsrTables) get the compiled
    kernel; the rest go through `hits` and numpy, to the same numbers.
    """

    orders: tuple[int, ...]  # n-gram lengths it holds weights for, e.g. (2, 3)

    def hits(self, ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The cells of the grid of candidate ids, shape (len(ids[0]), ..., len(ids[-1])), whose
        n-gram was seen: (flat C-order cell indices, strictly ascending; W there, > 0), with
        W = p(n-gram) / prod p(unigram); every other cell has W = 0. len(ids) is one of `orders`.
        """


@dataclass(frozen=True)
class TopK:
    """A head's candidates in grid order and their probabilities (not renormalised unless stated)."""

    ids: np.ndarray  # (k,) int64
    probs: np.ndarray  # (k,) float64


class StepResult(NamedTuple):
    """A step's outcome (a named tuple: made every pass, and cheaper to make than a dataclass)."""

    tokens: tuple[int, ...]  # 1..n tokens to emit, in order
    backoffs: int  # times n was lowered before emitting (n_heads - len(tokens))


def head_topk(logits_row: np.ndarray, top_k: int, temperature: float, use_native: bool = True) -> TopK:
    """Head's top-k tokens (descending logit, ties by id) with their softmax(logits / T) probabilities."""
    return heads_topk(np.asarray(logits_row)[None], top_k, temperature, use_native)[0]


def heads_topk(logits: np.ndarray, top_k: int, temperature: float, use_native: bool = True) -> list[TopK]:
    """`head_topk` of every row of (heads, vocab) `logits` (runtime/marginals.py).

    The compiled kernel does them all in one call where numpy takes dozens, to the same
    bits; `use_native=False` keeps to numpy.
    """
    return [
        TopK(ids, probs)
        for ids, probs in zip(*topk_arrays(logits, top_k, temperature, use_native), strict=True)
    ]


def binomial_kernel(size: int) -> np.ndarray:
    """The discrete Gaussian of odd width `size`: a row of Pascal's triangle over 2 ** (size - 1)."""
    return np.array([math.comb(size - 1, j) for j in range(size)], dtype=np.float64) / 2.0 ** (size - 1)


@dataclass
class _Joint:
    """J over a grid of `shape`, in one of two forms.

    Dense (`cells` is None): `values` is the whole grid. Sparse (a weighted J lives on
    the stored n-grams, a few thousand of 125k cells, and Otsu keeps a few dozen of
    those): `cells` are flat C-order cell indices, ascending, `values` J there, and
    every other cell is 0.
    """

    shape: tuple[int, ...]
    values: np.ndarray
    cells: np.ndarray | None = None

    def peak(self) -> float:
        return float(self.values.max()) if self.values.size else 0.0

    def draw(self, greedy: bool, rng: np.random.Generator) -> int:
        """Flat index of the drawn cell (see `_draw`): the same cell in either form, up to rounding."""
        if self.cells is None:
            return _draw(self.values, greedy, rng)
        return int(self.cells[_draw_sequential(self.values, greedy, rng)])

    def dense(self) -> np.ndarray:
        if self.cells is None:
            return self.values
        grid = np.zeros(self.shape)
        grid.reshape(-1)[self.cells] = self.values
        return grid


class DynamicSampler:
    """Algorithm 1 for one generation stream, with scratch grids kept between steps (not thread-safe).

    Every cell of J and every emit/back-off decision is the one the plain whole-grid
    computation gives, to the last bit (tests/test_sampling.py holds both to that);
    the speed comes from skipping work that cannot change them. The static
    threshold, Otsu and the repetition penalty only lower cells, so when J's largest
    entry before them is at most eps_b ** (n - 1) the step backs off right there, as
    the reference does, drawing no random number either way. Without weights that
    entry is the product of the heads' top probabilities, known before any grid is
    built; with weights it is known once the grid is weighted, before the blur.
    With weights J lives on the stored n-grams alone (a few thousand of 125k cells),
    and Otsu only needs the blurred grid near J's largest cells; it usually keeps a
    few dozen, and the penalty and the draw then work on those alone (the draw with
    the reference's own running sum). runtime/native.py does the whole step, from the
    logits to the tokens, in one C call where it applies, to the same bits.
    """

    def __init__(self, use_native: bool = True) -> None:
        """`use_native=False` keeps to numpy where the compiled joint (runtime/native.py) would serve."""
        self._scratch: dict[str, np.ndarray] = {}
        self._native = native.NativeSampler() if use_native and native.AVAILABLE else None

    def step(
        self,
        logits: np.ndarray,
        generated: Sequence[int] | np.ndarray | SeenTokens,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
        rng: np.random.Generator,
    ) -> StepResult:
        """Tokens to emit from one forward pass; `logits` is (n_heads, vocab) at the last position.

        `generated` is cheapest as a `SeenTokens` kept by the caller (anything else is sorted
        every step).
        """
        logits = _check_logits(logits)
        n_heads, vocab = logits.shape
        # eps_b = 1 can never emit more than one token: skip building the grids.
        used = n_heads if config.eps_b < 1 else 1
        if self._native is not None and self._native.can_step(masks, config, used, min(config.top_k, vocab)):
            tokens = self._native.step(logits, _seen_mask(generated, vocab), rng)
            if tokens is not None:  # None: logits the kernel does not read (native.reads)
                return StepResult(tokens, n_heads - len(tokens))
        token_set = _token_set(generated)
        temperature = config.temperature or 1.0
        ids, probs = topk_arrays(logits[:used], config.top_k, temperature, self._native is not None)
        topks = [TopK(i, p) for i, p in zip(ids, probs, strict=True)]
        for n in range(used, 1, -1):
            joint = self._joint_above(topks[:n], token_set, masks, config, config.eps_b ** (n - 1))
            if joint is not None:
                cell = np.unravel_index(joint.draw(config.greedy, rng), joint.shape)
                return StepResult(
                    tuple(int(t.ids[i]) for t, i in zip(topks[:n], cell, strict=True)), n_heads - n
                )
        return StepResult((_draw_head1(topks[0], token_set, config, rng),), n_heads - 1)

    def joint(
        self,
        topks: Sequence[TopK],
        generated: Sequence[int] | np.ndarray | SeenTokens,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
    ) -> np.ndarray:
        """J over the grid of `topks` after weighting, both thresholds and the penalty.

        The array may be a scratch buffer of this sampler, valid until its next call.
        """
        joint = self._joint_above(topks, _token_set(generated), masks, config, -math.inf)
        assert joint is not None  # every J exceeds -inf
        return joint.dense()

    def _joint_above(
        self,
        topks: Sequence[TopK],
        token_set: SeenTokens | _SortedTokens,
        masks: CooccurrenceWeights | None,
        config: SamplingConfig,
        bound: float,
    ) -> _Joint | None:
        """J if min(max J, 1) > bound, else None -- decided as early as the work allows."""
        if masks is not None and config.alpha_c > 0 and len(topks) in masks.orders:
            joint = self._weighted_joint(topks, masks, config, bound)
        else:
            joint = self._product_joint(topks, config, bound)
        if joint is None:
            return None
        if config.repetition_penalty != 1 and token_set.any:
            _penalise(joint, topks, token_set, config.repetition_penalty)
        return joint if min(joint.peak(), 1.0) > bound else None

    def _product_joint(self, topks: Sequence[TopK], config: SamplingConfig, bound: float) -> _Joint | None:
        """J = the product of marginals over the whole grid, thresholded; None if it cannot beat `bound`."""
        shape = tuple(t.ids.size for t in topks)
        # The grid's largest cell is the product of the heads' largest probabilities, to the
        # last bit (rounding is monotone), and the thresholds only lower cells.
        if min(math.prod(float(t.probs.max()) for t in topks), 1.0) <= bound:
            return None
        grid = self._buffer("joint", shape)
        _outer(grid, [t.probs for t in topks])  # (k_1, ..., k_n)
        if config.static_threshold > 0:
            grid[grid < config.static_threshold] = 0.0
        return self._otsu(grid, config.blur) if config.adaptive else _Joint(shape, grid)

    def _weighted_joint(
        self, topks: Sequence[TopK], masks: CooccurrenceWeights, config: SamplingConfig, bound: float
    ) -> _Joint | None:
        """J over the stored n-grams alone (every other cell is 0), thresholded; None if it cannot beat `bound`.

        Each cell is rounded as on the whole grid: ((f_1 f_2) ...) f_n, then times W.
        """
        shape = tuple(t.ids.size for t in topks)
        mass = math.prod(_running_sum(t.probs) for t in topks)
        # J <= mass in every cell (J scales R, whose cells each hold at most sum R, to mass):
        # past a rounding margin no lookup can lift it over the bound.
        if min(mass * (1 + 1e-9), 1.0) <= bound:
            return None
        if native.supports(len(shape), math.prod(shape), config.alpha_c, config.adaptive, config.blur) and (
            self._native is not None and hasattr(masks, "csr_tables")
        ):
            found = self._native.joint(
                [t.ids for t in topks],
                [t.probs for t in topks],
                masks.csr_tables(),
                mass,
                bound,
                config.static_threshold,
                config.adaptive,
                config.blur,
            )
            return None if found is None else _Joint(shape, found[1], found[0])
        cells, weights = masks.hits([t.ids for t in topks])
        _check_hits(cells, weights, shape)
        if config.alpha_c != 1:  # in float64: masks may store float32
            weights = np.power(weights, config.alpha_c, dtype=np.float64)
        lead = topks[0].probs
        for t in topks[1:-1]:
            lead = np.multiply.outer(lead, t.probs)
        values = lead.reshape(-1)[cells // shape[-1]] * topks[-1].probs[cells % shape[-1]]
        values *= weights
        total = float(np.cumsum(values)[-1]) if values.size else 0.0  # the running sum in C order
        if not total > 0:  # every cell masked (or underflowed): J = 0
            return None if bound >= 0 else _Joint(shape, np.zeros(0), cells[:0])
        scale = mass / total
        peak = values.max() * scale  # the largest of values * scale: rounding is monotone
        if min(peak, 1.0) <= bound:
            return None
        values *= scale
        if config.static_threshold > 0:
            values[values < config.static_threshold] = 0.0
        if not config.adaptive:
            return _Joint(shape, values, cells)
        return self._sparse_otsu(shape, cells, values, config.blur)

    def _sparse_otsu(
        self, shape: tuple[int, ...], cells: np.ndarray, values: np.ndarray, blur: int
    ) -> _Joint:
        """`_otsu` of a J that is 0 outside `cells`, working near its largest cells only.

        Cells that can leave Otsu's bin 0 have B >= max B / 512 (at least half a bin up from
        min B = 0, which some cell holds when the live cells' neighbourhoods cannot cover
        the grid). With a blur of radius r, B(x) <= ratio * (largest J within r of x) and
        max B >= centre * max J, so such cells lie within r of a cell with J >= max J /
        (512 * ratio / centre), a margin of 2 kept against rounding. The blur runs on the
        box around those cells widened by r, plus r more so that the cropped borders
        (mirrored as if they were the grid's) reach no cell of the inner box; blurring
        adds the same terms in the same order per cell, so B there is bit for bit the
        whole grid's.
        """
        positive = values > 0
        radius = blur // 2 if blur > 1 else 0
        if not positive.any():  # J = 0: a constant B keeps everything
            return _Joint(shape, values[:0], cells[:0])
        if np.count_nonzero(positive) * (2 * radius + 1) ** len(shape) >= math.prod(shape):
            grid = self._buffer("joint", shape)  # min B may be above 0: the whole grid it is
            grid.fill(0.0)
            grid.reshape(-1)[cells] = values
            return self._otsu(grid, blur)
        # Per axis, sum of the kernel over its centre: 2 ** (blur - 1) / C(blur - 1, r).
        spread = (2.0 ** (blur - 1) / math.comb(blur - 1, radius) if radius else 1.0) ** len(shape)
        floor = values.max() / (2 * 2 * OTSU_BINS * spread)
        near = np.unravel_index(cells[values >= floor], shape)
        inner = [
            (max(int(c.min()) - radius, 0), min(int(c.max()) + radius + 1, n))
            for c, n in zip(near, shape, strict=True)
        ]
        crop = [(max(a - radius, 0), min(b + radius, n)) for (a, b), n in zip(inner, shape, strict=True)]
        box = self._buffer("crop", tuple(b - a for a, b in crop))
        box.fill(0.0)
        coords = np.unravel_index(cells, shape)
        inside = np.ones(cells.size, dtype=bool)
        for c, (a, b) in zip(coords, crop, strict=True):
            inside &= (c >= a) & (c < b)
        local = tuple(c[inside] - a for c, (a, _) in zip(coords, crop, strict=True))
        box[local] = values[inside]
        blurred = self._blurred(box, blur)[
            tuple(slice(a - ca, b - ca) for (a, b), (ca, _) in zip(inner, crop, strict=True))
        ]
        hi = blurred.max()
        scale = OTSU_BINS / (hi - 0.0)  # min B = 0
        candidates = np.flatnonzero(blurred >= 0.0 + 0.5 / scale)
        bins = _bins(blurred.reshape(-1)[candidates], 0.0, scale)
        counts = np.bincount(bins, minlength=OTSU_BINS)
        counts[0] += math.prod(shape) - candidates.size
        kept_local = np.unravel_index(candidates[bins > otsu_split(counts)], blurred.shape)
        kept = np.ravel_multi_index(
            tuple(c + a for c, (a, _) in zip(kept_local, inner, strict=True)), shape
        )  # ascending: a C-order walk of a box is one of the grid
        box_values = box[
            tuple(c + a - ca for c, (a, _), (ca, _) in zip(kept_local, inner, crop, strict=True))
        ]
        live = box_values > 0
        return _Joint(shape, box_values[live], kept[live])

    def _otsu(self, grid: np.ndarray, blur: int) -> _Joint:
        """J with the cells that Otsu's threshold on the (blurred) grid puts in the low class zeroed."""
        blurred = self._blurred(grid, blur).reshape(-1)
        lo, hi = blurred.min(), blurred.max()
        if not hi > lo:  # a constant grid keeps everything
            return _Joint(grid.shape, grid)
        scale = OTSU_BINS / (hi - lo)
        # Only cells at least half a bin above the minimum can leave bin 0; on peaked grids
        # a few hundred. Bin those exactly as every cell would be, count the rest in bin 0,
        # and keep J sparse; on flat grids bin everything and zero the low class in place.
        above = blurred >= lo + 0.5 / scale
        if np.count_nonzero(above) > blurred.size // _SPARSE_SHARE:
            bins = _bins(blurred, lo, scale, out=self._buffer("shifted", blurred.shape))
            low = bins <= otsu_split(np.bincount(bins, minlength=OTSU_BINS))
            np.multiply(grid.reshape(-1), ~low, out=grid.reshape(-1))  # x * 1 = x, x * 0 = +0: J >= 0
            return _Joint(grid.shape, grid)
        candidates = np.flatnonzero(above)
        bins = _bins(blurred[candidates], lo, scale)
        counts = np.bincount(bins, minlength=OTSU_BINS)
        counts[0] += blurred.size - candidates.size
        kept = candidates[bins > otsu_split(counts)]
        return _Joint(grid.shape, grid.reshape(-1)[kept], kept)

    def _blurred(self, grid: np.ndarray, blur: int) -> np.ndarray:
        """The grid blurred along every axis, up to a factor 2 ** ndim for blur = 3.

        Otsu's bins are affine in the values, so a power-of-2 factor, which rounds
        exactly, moves no cell between them.
        """
        if blur <= 1:
            return grid
        blurred = grid
        for axis in range(grid.ndim):
            out = self._buffer(f"blur{axis % 2}", grid.shape)  # ping-pong: neither filter works in place
            if blur == 3:  # the default: about 3x faster than correlate1d
                _blur3_twice(blurred, out, axis)
            else:
                correlate1d(blurred, binomial_kernel(blur), axis=axis, output=out, mode="mirror")
            blurred = out
        return blurred

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous scratch array of `shape`: a view of one flat array per name, grown on demand
        (crops come in many shapes; a buffer per shape would pile up over a long generation)."""
        size = math.prod(shape)
        flat = self._scratch.get(name)
        if flat is None or flat.size < size:
            flat = self._scratch[name] = np.empty(max(size, 1), dtype=np.float64)
        return flat[:size].reshape(shape)


def _blur3_twice(src: np.ndarray, out: np.ndarray, axis: int) -> None:
    """out = 2 * (src blurred by [1, 2, 1] / 4 along `axis`, borders mirrored), bit for bit.

    correlate1d computes c / 2 + (l + r) / 4 per cell; c + (l + r) / 2 rounds to
    exactly twice that. Both arrays are C-contiguous, so l + r is one add over the
    flat arrays, shifted by the axis' stride; it wraps wrongly only on the two faces
    of the axis, where mirroring makes l = r.
    """
    n = src.shape[axis]
    if n == 1:  # both neighbours mirror onto the cell: c + (c + c) / 2
        np.add(src, src, out=out)
        return
    stride = math.prod(src.shape[axis + 1 :])
    flat_src, flat_out = src.reshape(-1), out.reshape(-1)
    np.add(flat_src[: -2 * stride], flat_src[2 * stride :], out=flat_out[stride:-stride])
    lead = (slice(None),) * axis
    second, first = src[(*lead, slice(1, 2))], out[(*lead, slice(0, 1))]
    np.add(second, second, out=first)
    before_last, last = src[(*lead, slice(n - 2, n - 1))], out[(*lead, slice(n - 1, n))]
    np.add(before_last, before_last, out=last)
    out *= 0.5
    out += src


def _bins(values: np.ndarray, lo: float, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Otsu's bin of each value: floor((value - lo) * scale), the maximum in the last bin."""
    shifted = np.subtract(values, lo, out=out)
    shifted *= scale
    bins = shifted.astype(np.intp)  # floor: values are >= lo
    np.minimum(bins, OTSU_BINS - 1, out=bins)
    return bins


def _penalise(
    joint: _Joint, topks: Sequence[TopK], token_set: SeenTokens | _SortedTokens, penalty: float
) -> None:
    """Divide J by the penalty once per axis on which a cell's candidate was already generated."""
    index = None
    for axis, t in enumerate(topks):
        seen = token_set.contains(t.ids)
        if not seen.any():
            continue
        if joint.cells is None:
            joint.values[(slice(None),) * axis + (np.flatnonzero(seen),)] /= penalty
        else:
            if index is None:
                index = np.unravel_index(joint.cells, joint.shape)
            joint.values[seen[index[axis]]] /= penalty


def otsu_split(counts: np.ndarray) -> int:
    """Last bin of the low class: maximises n0 * n1 * (mu0 - mu1) ** 2 over splits of a histogram.

    With integer bin indices b and N cells of index sum S, n0 n1 (mu0 - mu1)^2
    = (N S0 - n0 S)^2 / (n0 n1): integers up to the final division.
    """
    index = np.arange(counts.size, dtype=np.int64)
    n0 = np.cumsum(counts)[:-1]
    s0 = np.cumsum(counts * index)[:-1]
    total, index_sum = int(counts.sum()), int(counts @ index)
    n1 = total - n0
    numerator = (total * s0 - n0 * index_sum).astype(np.float64) ** 2
    valid = (n0 > 0) & (n1 > 0)
    score = np.where(valid, numerator / np.where(valid, n0 * n1, 1), -1.0)
    return int(np.argmax(score))


def sample_ar(
    logits_head1: np.ndarray,
    generated: Sequence[int] | np.ndarray | SeenTokens,
    config: SamplingConfig,
    rng: np.random.Generator,
) -> int:
    """One token from head 1 (top-k, temperature, repetition penalty): `ar` mode, and n = 1 of Algorithm 1."""
    row = np.asarray(logits_head1)
    if row.ndim != 1 or row.size == 0:
        raise SamplingError(f"head-1 logits must be a non-empty (vocab,) array, got shape {row.shape}")
    top = head_topk(row, config.top_k, config.temperature or 1.0)
    return _draw_head1(top, _token_set(generated), config, rng)


def _draw_head1(
    top: TopK, token_set: SeenTokens | _SortedTokens, config: SamplingConfig, rng: np.random.Generator
) -> int:
    return int(top.ids[_draw(_penalised(top, token_set, config), config.greedy, rng)])


def _penalised(top: TopK, token_set: SeenTokens | _SortedTokens, config: SamplingConfig) -> np.ndarray:
    if config.repetition_penalty == 1 or not token_set.any:
        return top.probs
    return top.probs / np.where(token_set.contains(top.ids), config.repetition_penalty, 1.0)


class SeenTokens:
    """The generated ids as a membership mask over the vocabulary, for a caller that generates
    token by token: it adds each accepted token once, where a plain history would be sorted
    again every step. Pass it wherever the sampler takes `generated`."""

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


class _SortedTokens:
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

    def __init__(self, base: SeenTokens | _SortedTokens | ExtendedTokens, extra: Sequence[int]) -> None:
        self.base = base
        self.extra = tuple(int(t) for t in extra)
        self.any = base.any or bool(self.extra)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        found = self.base.contains(ids)
        for token in self.extra:
            found = found | (ids == token)
        return found


TokenSet = SeenTokens | _SortedTokens | ExtendedTokens


def tokens_plus(generated: Sequence[int] | np.ndarray | TokenSet, extra: Sequence[int]) -> ExtendedTokens:
    """`generated` and the ids in `extra`, as a set the sampler takes wherever it takes `generated`."""
    return ExtendedTokens(_token_set(generated), extra)


def _token_set(generated: Sequence[int] | np.ndarray | TokenSet) -> TokenSet:
    return generated if isinstance(generated, (SeenTokens, ExtendedTokens)) else _SortedTokens(generated)


def _draw(weights: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    """Flat index of a cell: argmax if greedy, else inverse CDF of one rng.random() in C order.

    A 1-D array (a head's top-k) is drawn with one running sum, the reference's draw to
    the last bit. A grid goes in two levels (sums of the slices along the first axis, then
    one slice) so a 50**3 grid is not cumsummed whole; the cell is the same as one running
    sum over the grid up to rounding.
    """
    if weights.ndim == 1:
        return _draw_sequential(weights, greedy, rng)
    flat = weights.reshape(-1)
    if greedy:
        return int(np.argmax(flat))
    rows = flat.reshape(weights.shape[0], -1)  # (k_1, cells / k_1): few long rows
    width = rows.shape[1]
    row_cdf = np.cumsum(rows.sum(axis=1))
    target = rng.random() * row_cdf[-1]
    r = _first_above(row_cdf, target)
    row_target = target - (row_cdf[r - 1] if r > 0 else 0.0)
    return r * width + _first_above(np.cumsum(rows[r]), row_target)


def _draw_sequential(weights: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    """A draw over a 1-D array with one running sum: the reference's draw, rounding included."""
    if greedy:
        return int(np.argmax(weights))
    cdf = np.cumsum(weights)
    return _first_above(cdf, rng.random() * cdf[-1])


def _first_above(cdf: np.ndarray, target: float) -> int:
    """First index with cdf > target; the last step of positive mass if rounding leaves none."""
    i = int(np.searchsorted(cdf, target, side="right"))
    if i < cdf.size:
        return i
    return int(np.flatnonzero(np.diff(cdf, prepend=0.0) > 0)[-1])


def _outer(out: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
    """out = v_1 (x) v_2 (x) ... computed as ((v_1 * v_2) * v_3) ...; only the last product is grid-sized."""
    partial = vectors[0]
    for v in vectors[1:-1]:
        partial = np.multiply.outer(partial, v)
    if len(vectors) == 1:
        out[...] = partial
    else:
        # einsum's outer product: the same single roundings as broadcasting, 1.4x faster.
        np.einsum("i,j->ij", partial.reshape(-1), vectors[-1], out=out.reshape(-1, out.shape[-1]))


def _running_sum(values: np.ndarray) -> float:
    """The sum in order, one addition at a time (numpy's sum pairs terms; the kernel adds in order)."""
    return float(np.cumsum(values)[-1])


def _seen_mask(generated: Sequence[int] | np.ndarray | SeenTokens, vocab: int) -> np.ndarray:
    """`generated` as a (vocab,) bool membership mask."""
    if isinstance(generated, SeenTokens):
        return generated.mask
    ids = np.asarray(generated, dtype=np.int64)
    mask = np.zeros(vocab, dtype=bool)
    mask[ids[(ids >= 0) & (ids < vocab)]] = True  # ids outside the vocabulary are no candidate's
    return mask


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or 0 in logits.shape:
        raise SamplingError(f"logits must be (n_heads, vocab) at the last position, got shape {logits.shape}")
    return logits


def _check_hits(cells: np.ndarray, weights: np.ndarray, shape: tuple[int, ...]) -> None:
    size = math.prod(shape)
    if (
        cells.ndim != 1
        or weights.shape != cells.shape
        or (cells.size and (cells[0] < 0 or cells[-1] >= size or np.any(cells[1:] <= cells[:-1])))
    ):
        raise SamplingError(
            f"co-occurrence hits must be strictly ascending cell ids in [0, {size}) of the {shape} "
            f"candidate grid with one weight each; got {cells.size} cells and weights of shape {weights.shape}"
        )


# --- verify mode: speculative sampling with head 1 as the target ------------------------------


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]  # drafted tokens, in order
    dists: tuple[TopK, ...]  # the normalised distribution each was drawn from (q)


@dataclass(frozen=True)
class Verified:
    tokens: tuple[int, ...]  # accepted drafts, then one corrected or bonus token
    accepted: int  # number of drafts accepted


def ar_distribution(
    logits_row: np.ndarray, generated: Sequence[int] | np.ndarray, config: SamplingConfig
) -> TopK:
    """The normalised distribution `sample_ar` draws from (top-k, temperature, penalty)."""
    return _normalised(head_topk(logits_row, config.top_k, config.temperature or 1.0), generated, config)


def _normalised(top: TopK, generated: Sequence[int] | np.ndarray, config: SamplingConfig) -> TopK:
    weights = _penalised(top, _token_set(generated), config)
    return TopK(top.ids, weights / weights.sum())


def draft_tokens(
    head_logits: np.ndarray,
    generated: Sequence[int] | np.ndarray,
    config: SamplingConfig,
    rng: np.random.Generator,
) -> Draft:
    """One draft per row of `head_logits` (heads 2..n at one position), each drawn from its head's
    `ar_distribution` with the earlier drafts counted as generated; greedy drafts take the argmax."""
    head_logits = _check_logits(head_logits)
    context = _token_set(generated)
    tokens, dists = [], []
    # Every head's top-k in one call: the penalty, which depends on the earlier drafts, comes after.
    for top in heads_topk(head_logits, config.top_k, config.temperature or 1.0):
        dist = _normalised(top, ExtendedTokens(context, tokens), config)
        token = int(dist.ids[_draw(dist.probs, config.greedy, rng)])
        tokens.append(token)
        dists.append(dist)
    return Draft(tuple(tokens), tuple(dists))


def verify_drafts(
    head1_logits: np.ndarray,
    draft: Draft,
    generated: Sequence[int] | np.ndarray,
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
    head1_logits = _check_logits(head1_logits)
    m = len(draft.tokens)
    if head1_logits.shape[0] != m + 1 or len(draft.dists) != m:
        raise SamplingError(
            f"{m} drafts need {m + 1} rows of head-1 logits and {m} draft distributions, "
            f"got {head1_logits.shape[0]} rows and {len(draft.dists)} distributions"
        )
    generated = _token_set(generated)
    temperature = config.temperature or 1.0
    for j, (token, q) in enumerate(zip(draft.tokens, draft.dists, strict=True)):
        # Head 1's top-k at a fed position only once the drafts before it passed: most passes
        # reject the first draft, and each row costs as much as the whole rest of the check.
        top = head_topk(head1_logits[j], config.top_k, temperature)
        context = ExtendedTokens(generated, draft.tokens[:j])
        if config.greedy:
            target = _draw_head1(top, context, config, rng)
            if target != token:
                return Verified((*draft.tokens[:j], target), j)
        else:
            p = _normalised(top, context, config)
            q_x = _prob(q, token)
            if q_x <= 0:
                raise SamplingError(f"draft token {token} has probability 0 under its own draft distribution")
            if rng.random() >= _prob(p, token) / q_x:
                return Verified((*draft.tokens[:j], _draw_residual(p, q, rng)), j)
    bonus = _draw_head1(
        head_topk(head1_logits[m], config.top_k, temperature),
        ExtendedTokens(generated, draft.tokens),
        config,
        rng,
    )
    return Verified((*draft.tokens, bonus), m)


def _prob(dist: TopK, token: int) -> float:
    hit = np.flatnonzero(dist.ids == token)
    return float(dist.probs[hit[0]]) if hit.size else 0.0


def _draw_residual(p: TopK, q: TopK, rng: np.random.Generator) -> int:
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
    return int(ids[_draw(residual, False, rng)])
