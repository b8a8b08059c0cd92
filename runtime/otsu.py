"""The `adaptive_threshold` stage: Otsu's threshold on the blurred joint (docs/METHOD.md).

B = J blurred along every axis with the binomial kernel of size `blur` ([1, 2, 1] / 4
for 3, OpenCV's 3-tap Gaussian), borders reflected without repeating the edge cell
(scipy's "mirror", OpenCV's default); B = J when blur is 0 or 1. B's values fall in
256 equal bins over [min B, max B] (skimage's default); the split is the bin boundary
that maximises the between-class variance, on integer bin indices with integer counts
(the variance is invariant under the affine map from index to bin centre, so this is
Otsu on bin centres, and equal scores tie exactly); the first best split wins. Cells
whose B lands in the lower class get J = 0; a constant B keeps everything.

Why not skimage: it is not a dependency of the runtime, and the histogram form is a
handful of vectorised lines that work on the few cells that can leave the lowest bin.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d

from runtime.grid import Grid, GridContext, Scratch

OTSU_BINS = 256
# Otsu's threshold keeps J sparse while at most 1 / _SPARSE_SHARE of the cells can leave
# its lowest bin: past that, whole-grid passes beat gathering the cells one by one.
_SPARSE_SHARE = 16


def adaptive_threshold(grid: Grid, ctx: GridContext) -> Grid:
    """J with the cells in Otsu's low class of B set to 0 (a no-op unless `adaptive`)."""
    if not ctx.config.adaptive:
        return grid
    blur, scratch = ctx.config.blur, ctx.scratch
    if grid.cells is None:
        grid.values, grid.cells = dense_otsu(grid.values, blur, scratch)
    else:
        grid.values, grid.cells = sparse_otsu(grid.shape, grid.cells, grid.values, blur, scratch)
    return grid


def sparse_otsu(
    shape: tuple[int, ...], cells: np.ndarray, values: np.ndarray, blur: int, scratch: Scratch
) -> tuple[np.ndarray, np.ndarray | None]:
    """`dense_otsu` of a J that is 0 outside `cells`, working near its largest cells only.

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
        return values[:0], cells[:0]
    if np.count_nonzero(positive) * (2 * radius + 1) ** len(shape) >= math.prod(shape):
        grid = scratch.buffer("joint", shape)  # min B may be above 0: the whole grid it is
        grid.fill(0.0)
        grid.reshape(-1)[cells] = values
        return dense_otsu(grid, blur, scratch)
    # Per axis, sum of the kernel over its centre: 2 ** (blur - 1) / C(blur - 1, r).
    spread = (2.0 ** (blur - 1) / math.comb(blur - 1, radius) if radius else 1.0) ** len(shape)
    floor = values.max() / (2 * 2 * OTSU_BINS * spread)
    near = np.unravel_index(cells[values >= floor], shape)
    inner = [
        (max(int(c.min()) - radius, 0), min(int(c.max()) + radius + 1, n))
        for c, n in zip(near, shape, strict=True)
    ]
    crop = [(max(a - radius, 0), min(b + radius, n)) for (a, b), n in zip(inner, shape, strict=True)]
    box = scratch.buffer("crop", tuple(b - a for a, b in crop))
    box.fill(0.0)
    coords = np.unravel_index(cells, shape)
    inside = np.ones(cells.size, dtype=bool)
    for c, (a, b) in zip(coords, crop, strict=True):
        inside &= (c >= a) & (c < b)
    local = tuple(c[inside] - a for c, (a, _) in zip(coords, crop, strict=True))
    box[local] = values[inside]
    blurred = blurred_grid(box, blur, scratch)[
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
    box_values = box[tuple(c + a - ca for c, (a, _), (ca, _) in zip(kept_local, inner, crop, strict=True))]
    live = box_values > 0
    return box_values[live], kept[live]


def dense_otsu(grid: np.ndarray, blur: int, scratch: Scratch) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, cells) of J with the cells that Otsu's threshold on the (blurred) grid puts in
    the low class zeroed: the whole grid (cells None), or the kept cells alone."""
    blurred = blurred_grid(grid, blur, scratch).reshape(-1)
    lo, hi = blurred.min(), blurred.max()
    if not hi > lo:  # a constant grid keeps everything
        return grid, None
    scale = OTSU_BINS / (hi - lo)
    # Only cells at least half a bin above the minimum can leave bin 0; on peaked grids
    # a few hundred. Bin those exactly as every cell would be, count the rest in bin 0,
    # and keep J sparse; on flat grids bin everything and zero the low class in place.
    above = blurred >= lo + 0.5 / scale
    if np.count_nonzero(above) > blurred.size // _SPARSE_SHARE:
        bins = _bins(blurred, lo, scale, out=scratch.buffer("shifted", blurred.shape))
        low = bins <= otsu_split(np.bincount(bins, minlength=OTSU_BINS))
        np.multiply(grid.reshape(-1), ~low, out=grid.reshape(-1))  # x * 1 = x, x * 0 = +0: J >= 0
        return grid, None
    candidates = np.flatnonzero(above)
    bins = _bins(blurred[candidates], lo, scale)
    counts = np.bincount(bins, minlength=OTSU_BINS)
    counts[0] += blurred.size - candidates.size
    kept = candidates[bins > otsu_split(counts)]
    return grid.reshape(-1)[kept], kept


def blurred_grid(grid: np.ndarray, blur: int, scratch: Scratch) -> np.ndarray:
    """The grid blurred along every axis, up to a factor 2 ** ndim for blur = 3.

    Otsu's bins are affine in the values, so a power-of-2 factor, which rounds
    exactly, moves no cell between them.
    """
    if blur <= 1:
        return grid
    blurred = grid
    for axis in range(grid.ndim):
        out = scratch.buffer(f"blur{axis % 2}", grid.shape)  # ping-pong: neither filter works in place
        if blur == 3:  # the default: about 3x faster than correlate1d
            blur3_twice(blurred, out, axis)
        else:
            correlate1d(blurred, binomial_kernel(blur), axis=axis, output=out, mode="mirror")
        blurred = out
    return blurred


def binomial_kernel(size: int) -> np.ndarray:
    """The discrete Gaussian of odd width `size`: a row of Pascal's triangle over 2 ** (size - 1)."""
    return np.array([math.comb(size - 1, j) for j in range(size)], dtype=np.float64) / 2.0 ** (size - 1)


def blur3_twice(src: np.ndarray, out: np.ndarray, axis: int) -> None:
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
