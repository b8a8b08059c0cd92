"""The numpy stages that work on one candidate grid: joint, weight, static_threshold, penalty, backoff.

(adaptive_threshold has its own module, runtime/otsu.py.) Each stage takes the grid
and the step's context and returns the grid, or None once it has shown that the grid
cannot beat its bound (`stages.beats`): the thresholds and the penalty only lower
cells, so such a grid backs off whatever comes after. docs/METHOD.md defines J; every
cell here is rounded as it is on the whole grid, so the early exits and the sparse
form change no bit of J and no decision (tests/test_sampling.py holds them to the
whole-grid definition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.config import SamplingConfig
from runtime.draws import draw, draw_sequential
from runtime.errors import SamplingError
from runtime.marginals import TopK
from runtime.stages import beats
from runtime.tokensets import TokenSet


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


@dataclass
class Grid:
    """J over the grid of `topks`, in one of two forms.

    Dense (`cells` is None): `values` is the whole grid. Sparse (a weighted J lives on
    the stored n-grams, a few thousand of 125k cells, and Otsu keeps a few dozen of
    those): `cells` are flat C-order cell indices, ascending, `values` J there, and
    every other cell is 0. `weights` holds W at `cells` between the joint and weight stages.
    """

    topks: Sequence[TopK]
    bound: float  # eps_b ** (n - 1): the grid emits iff beats(max J, bound)
    values: np.ndarray | None = None
    cells: np.ndarray | None = None
    weights: np.ndarray | None = None
    mass: float = 0.0  # M = the plain product's mass over the grid, where weights apply

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(t.ids.size for t in self.topks)

    def peak(self) -> float:
        return float(self.values.max()) if self.values.size else 0.0

    def draw(self, greedy: bool, rng: np.random.Generator) -> int:
        """Flat index of the drawn cell (runtime/draws.py): the same cell in either form, up to rounding."""
        if self.cells is None:
            return draw(self.values, greedy, rng)
        return int(self.cells[draw_sequential(self.values, greedy, rng)])

    def dense(self) -> np.ndarray:
        if self.cells is None:
            return self.values
        grid = np.zeros(self.shape)
        grid.reshape(-1)[self.cells] = self.values
        return grid


class Scratch:
    """Named scratch arrays kept between steps: one flat array per name, grown on demand (crops
    come in many shapes; a buffer per shape would pile up over a long generation)."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous float64 array of `shape`, a view of the flat array called `name`."""
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = np.empty(max(size, 1), dtype=np.float64)
        return flat[:size].reshape(shape)


@dataclass(frozen=True)
class GridContext:
    """What the grid stages read besides the grid: one step's inputs and the sampler's scratch."""

    masks: CooccurrenceWeights | None
    config: SamplingConfig
    generated: TokenSet
    scratch: Scratch

    def weighted(self, n: int) -> bool:
        """Whether the co-occurrence weights apply to a grid of n heads."""
        return self.masks is not None and self.config.alpha_c > 0 and n in self.masks.orders


def joint(grid: Grid, ctx: GridContext) -> Grid | None:
    """The product of marginals: on the stored n-grams only where weights follow (W = 0 elsewhere
    masks every other cell), else over the whole grid, rounded as ((f_1 f_2) ...) f_n."""
    topks, shape = grid.topks, grid.shape
    if ctx.weighted(len(topks)):
        grid.mass = math.prod(running_sum(t.probs) for t in topks)
        # J <= mass in every cell (J scales R, whose cells each hold at most sum R, to mass):
        # past a rounding margin no lookup can lift it over the bound.
        if not beats(grid.mass * (1 + 1e-9), grid.bound):
            return None
        cells, weights = ctx.masks.hits([t.ids for t in topks])
        check_hits(cells, weights, shape)
        lead = topks[0].probs
        for t in topks[1:-1]:
            lead = np.multiply.outer(lead, t.probs)
        grid.cells, grid.weights = cells, weights
        grid.values = lead.reshape(-1)[cells // shape[-1]] * topks[-1].probs[cells % shape[-1]]
        return grid
    # The grid's largest cell is the product of the heads' largest probabilities, to the
    # last bit (rounding is monotone), and no later stage raises a cell.
    if not beats(math.prod(float(t.probs.max()) for t in topks), grid.bound):
        return None
    grid.values = ctx.scratch.buffer("joint", shape)
    outer(grid.values, [t.probs for t in topks])  # (k_1, ..., k_n)
    return grid


def weight(grid: Grid, ctx: GridContext) -> Grid | None:
    """J = R * M / sum R with R = product * W ** alpha_c: the weights move mass inside the grid
    and never create it. If every cell is masked (sum R = 0), J = 0."""
    if grid.weights is None:  # no weights apply: J is the product itself
        return grid
    weights = grid.weights
    if ctx.config.alpha_c != 1:  # in float64: masks may store float32
        weights = np.power(weights, ctx.config.alpha_c, dtype=np.float64)
    values = grid.values
    values *= weights
    grid.weights = None
    total = running_sum(values) if values.size else 0.0  # the running sum in C order
    if not total > 0:  # every cell masked (or underflowed): J = 0
        if grid.bound >= 0:
            return None
        grid.values, grid.cells = values[:0], grid.cells[:0]
        return grid
    scale = grid.mass / total
    if not beats(values.max() * scale, grid.bound):  # the largest of values * scale: rounding is monotone
        return None
    values *= scale
    return grid


def static_threshold(grid: Grid, ctx: GridContext) -> Grid:
    """Cells with J < static_threshold become 0."""
    threshold = ctx.config.static_threshold
    if threshold > 0:
        grid.values[grid.values < threshold] = 0.0
    return grid


def penalty(grid: Grid, ctx: GridContext) -> Grid:
    """Divide J by the penalty once per axis whose candidate `ar` would penalise there.

    That is a candidate already generated or equal to the cell's candidate on an earlier
    axis: `ar` emitting the cell's tokens one by one would have the earlier ones in its
    history (a cell (a, a, a) is divided twice for a never generated).
    """
    value = ctx.config.repetition_penalty
    if value == 1:
        return grid
    ids = [t.ids for t in grid.topks]
    if grid.cells is None:
        coords = np.ix_(*(np.arange(i.size) for i in ids))
    else:
        coords = np.unravel_index(grid.cells, grid.shape)
    for axis, t in enumerate(ids):
        repeated = ctx.generated.contains(t)[coords[axis]]
        for earlier in range(axis):
            repeated = repeated | (ids[earlier][coords[earlier]] == t[coords[axis]])
        if repeated.any():
            grid.values[np.broadcast_to(repeated, grid.values.shape)] /= value
    return grid


def backoff(grid: Grid, ctx: GridContext) -> Grid | None:
    """The grid if its largest cell beats the bound, else None: n is lowered."""
    return grid if beats(grid.peak(), grid.bound) else None


def outer(out: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
    """out = v_1 (x) v_2 (x) ... computed as ((v_1 * v_2) * v_3) ...; only the last product is grid-sized."""
    partial = vectors[0]
    for v in vectors[1:-1]:
        partial = np.multiply.outer(partial, v)
    if len(vectors) == 1:
        out[...] = partial
    else:
        # einsum's outer product: the same single roundings as broadcasting, 1.4x faster.
        np.einsum("i,j->ij", partial.reshape(-1), vectors[-1], out=out.reshape(-1, out.shape[-1]))


def running_sum(values: np.ndarray) -> float:
    """The sum in order, one addition at a time (numpy's sum pairs terms; the kernel adds in order)."""
    return float(np.cumsum(values)[-1])


def check_hits(cells: np.ndarray, weights: np.ndarray, shape: tuple[int, ...]) -> None:
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
