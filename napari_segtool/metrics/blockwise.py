"""Metrics of label volumes larger than memory, accumulated block by block.

Every overlap metric is a function of the confusion counts
(:mod:`napari_segtool.metrics.overlap`), and the counts are sums over voxels: summed over
blocks of slices they are the whole volume's, integer for integer. So
:func:`evaluate_blockwise` gives exactly the numbers of :func:`~napari_segtool.metrics.evaluate`
while reading one block of each volume at a time (numpy, zarr, dask, or any array with
``shape``, ``dtype`` and slicing along the first axis). The blocks are read and counted by
:func:`~napari_segtool.metrics.tracker.iter_blocks`, the reading loop the confusion tracker
uses too. Label ids are collected as the blocks come: the table grows by a row and a column
for each id not seen before.

Surface distances are not sums (the nearest surface voxel may lie in any block), so they are
computed exactly, in memory, only up to :data:`DISTANCE_MAX_VOXELS`; above it, per slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.memory import check_allocation
from napari_segtool.metrics.overlap import check_pair, overlap_metrics
from napari_segtool.metrics.report import DISTANCE_KEYS, SUMMARY_KEYS, evaluate, slice_metrics
from napari_segtool.metrics.tracker import BLOCK_VOXELS, BlockCounts, block_units, iter_blocks

__all__ = [
    "BLOCK_VOXELS",
    "DISTANCE_MAX_VOXELS",
    "PartialCounts",
    "combine_counts",
    "confusion_blockwise",
    "count_rows",
    "evaluate_blockwise",
]

#: Largest volume (voxels) whose surface distances (HD, HD95, ASSD) are computed: both label
#: volumes are then read into memory (512**3 uint8 voxels: 128 MiB each, plus the masks).
DISTANCE_MAX_VOXELS = 512**3

Progress = Callable[[int, int], None]


def _shape(pred: Any, ref: Any) -> tuple[int, ...]:
    """The pair's shape, after a check of the shapes and dtypes (no voxel read)."""
    check_pair(pred, ref, values=False)
    return tuple(int(n) for n in pred.shape)


def _blocks(
    pred: Any, ref: Any, *, per_slice: bool, block_voxels: int, progress: Progress | None
) -> Iterator[tuple[NDArray, NDArray, BlockCounts]]:
    """``(pred[a:b], ref[a:b], counts)`` block by block along the first axis.

    The counts are per slice with ``per_slice``, else of the whole block (one unit).
    """
    n = int(pred.shape[0]) if pred.shape else 0
    rows = 1 if per_slice else block_units(pred, block_voxels=block_voxels)
    for p, [r], [counts] in iter_blocks(pred, [ref], rows=rows, block_voxels=block_voxels):
        yield p, r, counts
        if progress is not None:
            progress(min(counts.stop * rows, n), n)


class _Table:
    """A confusion table over the ids seen so far, grown as new ids arrive."""

    def __init__(self) -> None:
        self.ids = np.zeros(1, np.int64)
        self.cm = np.zeros((1, 1), np.int64)

    def add(self, ids: NDArray[np.int64], cm: NDArray[np.int64]) -> None:
        union = np.union1d(self.ids, ids)
        if union.size != self.ids.size:
            k = int(union.size)
            check_allocation(
                k * k * 8 * 2,
                what=f"a confusion table of {k} x {k} label ids",
                hint="for instance labels (one id per object) use "
                "napari_segtool.metrics.instance_metrics",
            )
            grown = np.zeros((k, k), np.int64)
            at = np.searchsorted(union, self.ids)
            grown[np.ix_(at, at)] = self.cm
            self.ids, self.cm = union, grown
        at = np.searchsorted(self.ids, ids)
        self.cm[np.ix_(at, at)] += cm


def confusion_blockwise(
    pred: Any,
    ref: Any,
    *,
    block_voxels: int = BLOCK_VOXELS,
    progress: Progress | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:func:`~napari_segtool.metrics.compact_confusion` of two label volumes, block by block.

    Parameters
    ----------
    pred, ref : array-like of int or bool
        Label images of the same shape (numpy, zarr, dask, ...); read ``[a:b]`` along the
        first axis, a block of whole slices at a time.
    block_voxels : int
        Voxels per block of each volume (at least one slice; rounded to whole chunks of a
        chunked ``pred``, :func:`~napari_segtool.metrics.tracker.block_units`).
    progress : callable, optional
        ``progress(done, total)`` in slices, after each block.

    Returns
    -------
    ids, M : ndarray of int64
        The sorted label ids that occur (0 always first) and ``M[i, j]``, the voxels whose
        reference id is ``ids[i]`` and predicted id ``ids[j]``: equal to
        ``compact_confusion(pred, ref)``.

    Examples
    --------
    >>> pred = np.array([[0, 5], [5, 117]])
    >>> ref = np.array([[0, 5], [0, 117]])
    >>> ids, cm = confusion_blockwise(pred, ref, block_voxels=1)
    >>> ids.tolist(), cm.tolist()
    ([0, 5, 117], [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    """
    _shape(pred, ref)
    table = _Table()
    blocks = _blocks(pred, ref, per_slice=False, block_voxels=block_voxels, progress=progress)
    for _, _, counts in blocks:
        table.add(counts.ids, counts.counts.sum(0))
    return table.ids, table.cm


def _read_whole(pred: Any, ref: Any, shape: tuple[int, ...]) -> tuple[NDArray, NDArray]:
    """Both volumes in memory, after a check that they (and the distance masks) fit."""
    voxels = math.prod(shape)
    need = voxels * (np.dtype(pred.dtype).itemsize + np.dtype(ref.dtype).itemsize + 4)
    check_allocation(
        need,
        what=f"surface distances of {' x '.join(map(str, shape))} label volumes",
        hint="leave the distances out or evaluate a region of the volumes",
    )
    return np.asarray(pred[...]), np.asarray(ref[...])


def evaluate_blockwise(
    pred: Any,
    ref: Any,
    *,
    spacing: Sequence[float] | None = None,
    distances: bool = True,
    per_slice: bool = False,
    block_voxels: int = BLOCK_VOXELS,
    max_distance_voxels: int = DISTANCE_MAX_VOXELS,
    progress: Progress | None = None,
) -> dict[str, object]:
    """:func:`~napari_segtool.metrics.evaluate` of label volumes read block by block.

    Parameters
    ----------
    pred, ref : array-like of int or bool
        Label images of the same shape, ``(Y, X)`` or ``(Z, Y, X)`` (numpy, zarr, dask, or a
        lazy box of one such as :class:`~napari_segtool.io.zarr_io.RegionView`).
    spacing : sequence of float, optional
        Voxel size per axis (``(z, y, x)``); distances are in its units.
    distances : bool
        Compute ``hd``, ``hd95`` and ``assd`` (see Notes); without them those keys are None.
    per_slice : bool
        Also return ``per_slice``, the overlap metrics of each slice along Z (3D only).
    block_voxels : int
        Voxels of each volume read at a time (whole slices, at least one).
    max_distance_voxels : int
        Largest volume whose distances are computed over the volume
        (:data:`DISTANCE_MAX_VOXELS`).
    progress : callable, optional
        ``progress(done, total)`` in slices, after each block.

    Returns
    -------
    dict
        The keys and values of :func:`~napari_segtool.metrics.evaluate`: the overlap metrics
        are equal to its numbers exactly (the same integer counts).

    Raises
    ------
    InputError
        For labels of different shapes, non-integer or negative labels, and for distances of
        a volume above ``max_distance_voxels`` unless ``per_slice`` is set.

    Notes
    -----
    Distances need the whole masks: up to ``max_distance_voxels`` both volumes are read into
    memory and the result is ``evaluate``'s. Above it, with ``per_slice`` (3D), the volume's
    distances are None and each slice's entry gets its own 2D ``hd``, ``hd95`` and ``assd``
    (in-plane spacing, the mean over the slice's classes, as ``evaluate`` means them over a
    volume's); without ``per_slice`` the call is refused: leave the distances out, take them
    per slice, or evaluate a smaller box (a ``RegionView``).

    Examples
    --------
    >>> pred = np.array([[[0, 1], [1, 1]], [[0, 0], [2, 2]]])
    >>> ref = np.array([[[0, 1], [0, 1]], [[0, 0], [2, 0]]])
    >>> m = evaluate_blockwise(pred, ref, distances=False, block_voxels=4)
    >>> m == evaluate(pred, ref, distances=False)
    True
    """
    shape = _shape(pred, ref)
    voxels = math.prod(shape)
    per_slice = per_slice and len(shape) >= 3
    slice_distances = False
    if distances and voxels > max_distance_voxels:
        plane = math.prod(shape[1:])
        if not per_slice or plane > max_distance_voxels:
            raise InputError(
                f"surface distances are computed only up to {max_distance_voxels} voxels and "
                f"these labels have {voxels}; leave them out (distances=False), take them per "
                "slice (per_slice=True) or evaluate a region"
            )
        slice_distances = True
    if distances and not slice_distances:
        p, r = _read_whole(pred, ref, shape)
        if progress is not None:
            progress(shape[0], shape[0])
        return evaluate(p, r, spacing=spacing, distances=True, per_slice=per_slice)
    part = count_rows(pred, ref, per_slice=per_slice, slice_distances=slice_distances,
                      spacing=spacing, block_voxels=block_voxels, progress=progress)  # fmt: skip
    return combine_counts([part], per_slice=per_slice)


@dataclass
class PartialCounts:
    """The counts of a run of slices, which :func:`combine_counts` sums into metrics.

    Attributes
    ----------
    ids : ndarray of int64
        The sorted label ids seen (0 first).
    confusion : ndarray of int64, shape (k, k)
        Voxels per (reference id, predicted id).
    slices : list of dict
        The ``per_slice`` entries of those slices, in order (empty without ``per_slice``).
    """

    ids: NDArray[np.int64]
    confusion: NDArray[np.int64]
    slices: list[dict[str, object]]


def count_rows(
    pred: Any,
    ref: Any,
    *,
    per_slice: bool = False,
    slice_distances: bool = False,
    spacing: Sequence[float] | None = None,
    block_voxels: int = BLOCK_VOXELS,
    progress: Progress | None = None,
) -> PartialCounts:
    """The counts of two label volumes, block by block: one part of a split evaluation.

    A volume cut along Z into runs of slices (each a task on a cluster) gives parts whose
    :func:`combine_counts` equals :func:`evaluate_blockwise` of the whole without distances,
    integer for integer. ``slice_distances`` adds each slice's 2D distances (in-plane
    ``spacing``) to its ``per_slice`` entry.

    Examples
    --------
    >>> pred = np.array([[[0, 1], [1, 1]], [[0, 0], [2, 2]]])
    >>> ref = np.array([[[0, 1], [0, 1]], [[0, 0], [2, 0]]])
    >>> parts = [count_rows(pred[:1], ref[:1]), count_rows(pred[1:], ref[1:])]
    >>> combine_counts(parts) == evaluate_blockwise(pred, ref, distances=False)
    True
    """
    _shape(pred, ref)
    per_slice = per_slice and len(pred.shape) >= 3
    plane_spacing = None if spacing is None else (tuple(spacing)[-2:] or None)
    table = _Table()
    slices: list[dict[str, object]] = []
    blocks = _blocks(pred, ref, per_slice=per_slice, block_voxels=block_voxels, progress=progress)
    for p, r, counts in blocks:
        table.add(counts.ids, counts.counts.sum(0))
        if per_slice:
            labels = (p, r) if slice_distances else None
            slices.extend(slice_metrics(counts.counts, counts.ids, labels=labels,
                                        spacing=plane_spacing))  # fmt: skip
    return PartialCounts(table.ids, table.cm, slices)


def combine_counts(
    parts: Sequence[PartialCounts], *, per_slice: bool = False
) -> dict[str, object]:
    """The metrics of :func:`evaluate_blockwise` (distances None) from the parts of the
    volume in order along Z (:func:`count_rows`)."""
    table = _Table()
    slices: list[dict[str, object]] = []
    for part in parts:
        table.add(part.ids, part.confusion)
        slices.extend(part.slices)
    result = overlap_metrics(confusion=table.cm, ids=table.ids)
    for key in DISTANCE_KEYS:
        result[key] = None
    if per_slice:
        result["per_slice"] = slices
    ordered = {k: result[k] for k in SUMMARY_KEYS}
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    return ordered
