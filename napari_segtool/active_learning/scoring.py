"""Units to correct (slices, patches within slices, tiles of a 2D image) and their scores.

A *unit* is what the user is asked to correct in one go: a whole slice of a 3D stack, a
square patch within one slice of a stack, or a square tile of a large 2D image. Its score is
the mean (or top 5 %) per-voxel score inside it (uncertainty, or another per-voxel map of
:mod:`~napari_segtool.active_learning.signals`); its foreground fraction (the share of voxels
predicted as any class but background) lets a strategy skip units with nothing to segment;
its ``features`` (optional: the foreground and the score pooled on a coarse grid) describe
what the unit looks like to the model, for batches that are not near copies
(:mod:`~napari_segtool.active_learning.diversity`); its ``effort`` (optional) is the sum of a
per-voxel uncertainty over the unit, the voxels the user can expect to change there.

Scoring reads the uncertainty and the labels block by block (:func:`iter_score_units`): runs
of neighbouring units whose regions together fill a box (a few slices of a stack, the tiles
of one row of a 2D image) are read in one ``np.asarray(arr[box])``, so numpy, zarr and dask
arrays larger than memory are scored with memory bounded by a block, and give the same
scores.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.metrics.tracker import BLOCK_VOXELS


@dataclass(frozen=True)
class Unit:
    """One slice, patch or tile.

    ``index`` is the slice number, or the row-major number of the patch or tile in its grid;
    ``grid`` its position (``(z,)``, ``(z, row, col)`` or ``(row, col)``); ``region`` the
    index into the image. ``score``, ``foreground``, ``features`` and ``effort`` (None when
    not estimated) come from :func:`iter_score_units`.
    """

    index: int
    grid: tuple[int, ...]
    region: tuple[slice, ...]
    score: float = 0.0
    foreground: float = 0.0
    features: tuple[float, ...] = ()
    effort: float | None = None

    @property
    def label(self) -> str:
        if len(self.grid) == 1:
            return f"slice {self.grid[0]}"
        r = self.region[-2:]
        where = f"y {r[0].start}-{r[0].stop}, x {r[1].start}-{r[1].stop}"
        return f"slice {self.grid[0]}, {where}" if len(self.grid) == 3 else f"tile {where}"

    @property
    def box(self) -> tuple[int, int, int, int, int]:
        """``(z, y0, y1, x0, x1)`` of a patch (``z`` 0 for a tile of a 2D image), as a
        project records a reviewed patch."""
        if len(self.grid) == 1:
            raise InputError(f"{self.label} is a whole slice, not a patch")
        ys, xs = self.region[-2:]
        return (self.grid[0] if len(self.grid) == 3 else 0, ys.start, ys.stop, xs.start,
                xs.stop)  # fmt: skip


def make_units(shape: tuple[int, ...], *, tile: int | None = None) -> list[Unit]:
    """Slices of a ``(Z, Y, X)`` stack, ``tile`` x ``tile`` patches within each of its
    slices, or ``tile`` x ``tile`` tiles of a ``(Y, X)`` image.

    Edge tiles and patches are smaller when ``tile`` does not divide the image.

    >>> [u.label for u in make_units((2, 8, 8))]
    ['slice 0', 'slice 1']
    >>> [u.grid for u in make_units((5, 8), tile=4)]
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> [u.label for u in make_units((2, 4, 8), tile=4)][1:3]
    ['slice 0, y 0-4, x 4-8', 'slice 1, y 0-4, x 0-4']
    """
    if len(shape) == 3 and tile is None:
        return [Unit(z, (z,), (slice(z, z + 1),)) for z in range(shape[0])]
    if len(shape) not in (2, 3):
        raise InputError(f"units are slices or patches of a 3D stack or tiles of a 2D image, "
                         f"got {shape}")  # fmt: skip
    if tile is None or tile < 1:
        raise InputError("give the tile size for a 2D image")
    units = []
    ny, nx = shape[-2:]
    rows, cols = -(-ny // tile), -(-nx // tile)
    for z in range(shape[0] if len(shape) == 3 else 1):
        for r in range(rows):
            for c in range(cols):
                region = (slice(r * tile, min((r + 1) * tile, ny)),
                          slice(c * tile, min((c + 1) * tile, nx)))  # fmt: skip
                if len(shape) == 3:
                    grid, region = (z, r, c), (slice(z, z + 1), *region)
                else:
                    grid = (r, c)
                units.append(Unit(len(units), grid, region))
    return units


class ValueRangeError(InputError):
    """Uncertainty values outside the allowed range (``low`` and ``high`` of those read)."""

    def __init__(self, low: float, high: float, allowed: tuple[float, float]):
        super().__init__(
            f"uncertainty values from {low:.4g} to {high:.4g} are outside "
            f"[{allowed[0]:g}, {allowed[1]:g}]"
        )
        self.low, self.high = low, high


@dataclass(frozen=True)
class ScoreProgress:
    """Units scored so far (``done`` of ``total``), and the range of the uncertainty read.

    ``low`` and ``high`` ignore NaN: ``inf`` and ``-inf`` while no number has been read.
    """

    done: int
    total: int
    low: float
    high: float


def _box(region: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of a unit's region (missing trailing axes: all of them)."""
    full = tuple(region) + (slice(None),) * (len(shape) - len(region))
    return tuple(s.indices(int(n))[:2] for s, n in zip(full, shape, strict=True))


def _volume(box: tuple[tuple[int, int], ...]) -> int:
    return int(np.prod([max(b - a, 0) for a, b in box], dtype=np.int64))


def _blocks(
    units: Sequence[Unit], shape: Sequence[int], block_voxels: int
) -> Iterator[tuple[tuple[tuple[int, int], ...], list[Unit]]]:
    """Runs of consecutive units whose regions exactly fill their bounding box."""
    box: tuple[tuple[int, int], ...] | None = None
    group: list[Unit] = []
    filled = 0
    for u in units:
        ub = _box(u.region, shape)
        if box is not None:
            joined = tuple((min(a, c), max(b, d)) for (a, b), (c, d) in zip(box, ub, strict=True))
            size = _volume(joined)
            if size == filled + _volume(ub) and size <= block_voxels:
                box, filled = joined, size
                group.append(u)
                continue
            yield box, group
        box, group, filled = ub, [u], _volume(ub)
    if box is not None:
        yield box, group


def _range(block: NDArray) -> tuple[float, float]:
    """NaN-ignoring min and max (NaN for an all-NaN block), without numpy's warning.

    >>> _range(np.array([np.nan, 0.5, 0.2])), _range(np.array([np.nan]))
    ((0.2, 0.5), (nan, nan))
    """
    if block.size == 0:
        return float("inf"), float("-inf")
    return float(np.fmin.reduce(block, axis=None)), float(np.fmax.reduce(block, axis=None))


def _score(values: NDArray, reduce: str, top_fraction: float) -> float:
    flat = np.ascontiguousarray(values).reshape(-1)  # one memory order: same sums from any array
    if reduce == "top":
        k = max(1, round(top_fraction * flat.size))
        return float(np.mean(np.partition(flat, flat.size - k)[flat.size - k :]))
    return float(np.mean(flat))


def iter_score_units(
    units: Sequence[Unit],
    uncertainty: Any | None,
    labels: Any | None = None,
    *,
    reduce: str = "mean",
    top_fraction: float = 0.05,
    value_range: tuple[float, float] | None = None,
    block_voxels: int = BLOCK_VOXELS,
    features_grid: int | None = None,
    effort: Any | None = None,
) -> Generator[ScoreProgress, None, list[Unit]]:
    """Score ``units`` block by block, yielding progress; the return value is the units.

    Parameters
    ----------
    units : sequence of Unit
        From :func:`make_units` (any disjoint regions work; neighbours in order are read
        together).
    uncertainty : array of float, or None
        Per-voxel uncertainty of the image's spatial shape: numpy, zarr or dask, read only
        as ``np.asarray(uncertainty[box])``. None scores every unit 0 (for the random
        strategies, which need the foreground only).
    labels : array of int, optional
        The prediction, same shape, for each unit's foreground fraction (labels > 0).
    reduce, top_fraction
        As in :func:`score_units`.
    value_range : (float, float), optional
        Raise :class:`ValueRangeError` as soon as a block holds uncertainty outside it, or
        at the end when every value was NaN: a check that costs no extra pass over a lazy
        volume.
    block_voxels : int
        Voxels per array and block; a unit larger than that is read on its own.
    features_grid : int, optional
        Also give each unit its ``features`` (:func:`pooled_features`: the predicted
        foreground and the score averaged on this grid), read in the same pass.
    effort : array of float, optional
        A per-voxel uncertainty in [0, 1] of the same shape (numpy, zarr or dask), summed
        over each unit into its ``effort``: the voxels the user can expect to change there
        (on the bundled EM model and its sample, the flip-TTA ``combined`` uncertainty summed
        per slice came to 1.2-1.4 times the slice's wrong voxels, Spearman 0.70 over 30
        slices). Read in the same pass and held to ``value_range`` as well.

    Yields
    ------
    ScoreProgress
        After each block.

    Examples
    --------
    >>> gen = iter_score_units(make_units((3, 2, 2)), np.ones((3, 2, 2)), block_voxels=8)
    >>> [p.done for p in gen]
    [2, 3]
    """
    if reduce not in ("mean", "top"):
        raise InputError(f"reduce must be 'mean' or 'top', got {reduce!r}")
    source = uncertainty if uncertainty is not None else labels
    if source is None:
        raise InputError("score_units needs the uncertainty or the labels")
    shape = tuple(int(n) for n in source.shape)
    for name, arr in (("uncertainty", uncertainty), ("labels", labels), ("effort", effort)):
        if arr is not None and tuple(arr.shape) != shape:
            raise InputError(f"{name} {tuple(arr.shape)} does not match {shape}")
    out: list[Unit] = []
    low, high = float("inf"), float("-inf")
    for box, group in _blocks(units, shape, block_voxels):
        key = tuple(slice(a, b) for a, b in box)
        unc = None if uncertainty is None else np.asarray(uncertainty[key])
        lab = None if labels is None else np.asarray(labels[key])
        cost = None if effort is None else np.asarray(effort[key])
        if cost is not None and value_range is not None and effort is not uncertainty:
            lo, hi = _range(cost)  # the effort map is an uncertainty too: same bounds
            if lo < value_range[0] or hi > value_range[1]:
                raise ValueRangeError(lo, hi, value_range)
        if unc is not None:
            lo, hi = _range(unc)
            low, high = float(np.fmin(low, lo)), float(np.fmax(high, hi))
            if value_range is not None and (low < value_range[0] or high > value_range[1]):
                raise ValueRangeError(low, high, value_range)
        for u in group:
            sub = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(_box(u.region, shape), box,
                                                                       strict=True))  # fmt: skip
            score = 0.0 if unc is None else _score(unc[sub], reduce, top_fraction)
            fg = float(np.mean(lab[sub] > 0)) if lab is not None else 0.0
            feats: tuple[float, ...] = ()
            if features_grid:
                fg_mask = None if lab is None else lab[sub] > 0
                feats = pooled_features(fg_mask, None if unc is None else unc[sub], features_grid)
            spent = None if cost is None else float(np.nansum(cost[sub], dtype=np.float64))
            out.append(Unit(u.index, u.grid, u.region, score, fg, feats, spent))
        yield ScoreProgress(len(out), len(units), low, high)
    if value_range is not None and uncertainty is not None and out and low > high:
        raise ValueRangeError(float("nan"), float("nan"), value_range)  # NaN everywhere
    return out


def pooled_features(foreground: NDArray | None, score: NDArray | None,
                    grid: int = 8) -> tuple[float, ...]:  # fmt: skip
    """A unit's foreground mask and per-voxel score, each averaged on ``grid`` x ``grid``.

    Both are arrays of the unit's region (trailing two axes in-plane; a missing one is left
    out). Units smaller than the grid pool on as many cells as they have rows or columns.

    >>> fg = np.zeros((1, 4, 4), bool); fg[0, :2] = True
    >>> pooled_features(fg, None, 2)
    (1.0, 1.0, 0.0, 0.0)
    """
    out: list[float] = []
    for arr in (foreground, score):
        if arr is None:
            continue
        plane = np.asarray(arr, np.float32).reshape(-1, *arr.shape[-2:]).mean(axis=0)
        ys = np.array_split(np.arange(plane.shape[0]), min(grid, plane.shape[0]))
        xs = np.array_split(np.arange(plane.shape[1]), min(grid, plane.shape[1]))
        out += [float(plane[y[0] : y[-1] + 1, x[0] : x[-1] + 1].mean()) for y in ys for x in xs]
    return tuple(out)


def score_units(
    units: list[Unit],
    uncertainty: NDArray,
    labels: NDArray | None = None,
    *,
    reduce: str = "mean",
    top_fraction: float = 0.05,
    features_grid: int | None = None,
) -> list[Unit]:
    """The units with their ``score`` and ``foreground`` (share of labels > 0).

    ``uncertainty`` and ``labels`` have the image's spatial shape (numpy, zarr or dask:
    read block by block, see :func:`iter_score_units`). ``reduce="mean"`` scores a unit by
    its mean uncertainty; ``"top"`` by the mean of its ``top_fraction`` most uncertain
    voxels, which favours units with a few confused regions over units whose object
    boundaries are all a little uncertain.

    >>> u = make_units((2, 2, 2))
    >>> unc = np.array([[[0, 0], [0, 0]], [[1, 1], [0, 0]]], float)
    >>> [(s.score, s.foreground) for s in score_units(u, unc, (unc > 0).astype(int))]
    [(0.0, 0.0), (0.5, 0.5)]
    """
    scoring = iter_score_units(units, uncertainty, labels, reduce=reduce,
                               top_fraction=top_fraction, features_grid=features_grid)  # fmt: skip
    return run_to_end(scoring)
