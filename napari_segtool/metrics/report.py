"""One call for every metric of a label-image pair: what the CLI and the Review widget show."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from napari_segtool.metrics.overlap import check_pair, compact_confusion, overlap_metrics
from napari_segtool.metrics.surface import surface_metrics
from napari_segtool.metrics.tracker import slice_confusion

Direction = Literal["higher", "lower", "zero"]


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: its key, which way is better, and how it is shown.

    Attributes
    ----------
    name : str
        The key in :func:`evaluate`'s result, the CLI's JSON and the Review widget's table.
    better : {"higher", "lower", "zero"}
        Which values are better: higher, lower, or closer to 0 (a signed difference).
    needs_spacing : bool
        A distance in the units of the voxel spacing (costly: surface distances).
    """

    name: str
    better: Direction
    needs_spacing: bool = False

    def format(self, value: object) -> str:
        """The text shown for ``value``: 4 decimals, ``inf``, or ``-`` when not computed.

        >>> METRIC["dice"].format(0.5), METRIC["hd"].format(None), METRIC["hd"].format(np.inf)
        ('0.5000', '-', 'inf')
        """
        if value is None:
            return "-"
        if isinstance(value, float | np.floating):
            return "inf" if np.isinf(value) else f"{float(value):.4f}"
        return str(value)


#: The metric table, in display order: the one list the widget, the CLI and reports read.
METRICS: tuple[Metric, ...] = (
    Metric("dice", "higher"),
    Metric("iou", "higher"),
    Metric("pixel_accuracy", "higher"),
    Metric("mean_pixel_accuracy", "higher"),
    Metric("precision", "higher"),
    Metric("recall", "higher"),
    Metric("specificity", "higher"),
    Metric("voe", "lower"),
    Metric("rvd", "zero"),
    Metric("hd", "lower", needs_spacing=True),
    Metric("hd95", "lower", needs_spacing=True),
    Metric("assd", "lower", needs_spacing=True),
)
METRIC: dict[str, Metric] = {m.name: m for m in METRICS}
SUMMARY_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS)
DISTANCE_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS if m.needs_spacing)


def evaluate(
    pred: NDArray,
    ref: NDArray,
    *,
    spacing: Sequence[float] | None = None,
    distances: bool = True,
    per_slice: bool = False,
) -> dict[str, object]:
    """Every overlap metric and (optionally) the surface distances of a label-image pair.

    Parameters
    ----------
    pred, ref : ndarray of int
        Label images of the same shape, ``(Y, X)`` or ``(Z, Y, X)``; 0 is background.
    spacing : sequence of float, optional
        Voxel size per axis (``(z, y, x)``); distances are in its units.
    distances : bool
        Compute the :data:`DISTANCE_KEYS` (``hd``, ``hd95``, ``assd``: the costly part) per
        foreground class; without them those keys are None.
    per_slice : bool
        Also return ``per_slice``: a list with the overlap metrics of each slice along Z.

    Returns
    -------
    dict
        The keys of :data:`SUMMARY_KEYS` as macro means over the foreground classes present
        in either image, and ``per_class`` (label id, as in the images -> the same keys,
        without the two pixel accuracies). Counts are over the ids that occur, so sparse or
        large ids (TotalSegmentator's, a stray 65535) cost one row each. Distances are
        ``inf`` where exactly one image lacks a class (see
        :mod:`napari_segtool.metrics.surface`).
    """
    check_pair(pred, ref)
    ids, cm = compact_confusion(pred, ref)  # over the ids that occur, not up to the largest
    result = overlap_metrics(confusion=cm, ids=ids)
    per_class: dict[int, dict[str, float]] = result["per_class"]  # type: ignore[assignment]
    if distances:
        found, means = class_distances(pred, ref, per_class, spacing=spacing)
        for c, entry in per_class.items():
            entry.update(found[c])
        result.update(means)
    else:
        for key in DISTANCE_KEYS:
            result[key] = None
    if per_slice and pred.ndim >= 3:
        result["per_slice"] = slice_metrics(slice_confusion(pred, ref, ids=ids), ids)
    ordered = {k: result[k] for k in SUMMARY_KEYS}
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    return ordered


def class_distances(
    pred: NDArray,
    ref: NDArray,
    classes: Iterable[int],
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Surface distances of each class and their means: the distances :func:`evaluate` gives.

    Parameters
    ----------
    pred, ref : ndarray of int
        Label images of the same shape (a volume, or one slice of it); 0 is background.
    classes : iterable of int
        The label ids to measure (:func:`evaluate`: the foreground classes present in either
        image).
    spacing : sequence of float, optional
        Voxel size per axis of ``pred``; distances are in its units.

    Returns
    -------
    per_class : dict
        Label id -> ``hd``, ``hd95`` and ``assd`` of its masks
        (:func:`~napari_segtool.metrics.surface_metrics`: ``inf`` where one image lacks it).
    means : dict
        Each of :data:`DISTANCE_KEYS` -> its mean over ``classes``; 0.0 without classes.

    Examples
    --------
    >>> pred = np.array([[0, 1, 1, 0, 0, 0, 0, 0]])
    >>> ref = np.array([[0, 0, 0, 0, 0, 1, 1, 0]])
    >>> class_distances(pred, ref, [1])
    ({1: {'hd': 4.0, 'hd95': 3.95, 'assd': 3.5}}, {'hd': 4.0, 'hd95': 3.95, 'assd': 3.5})
    >>> class_distances(pred, ref, [])
    ({}, {'hd': 0.0, 'hd95': 0.0, 'assd': 0.0})
    """
    found = {c: surface_metrics(pred == c, ref == c, spacing=spacing) for c in classes}
    means = {}
    for key in DISTANCE_KEYS:
        values = [entry[key] for entry in found.values()]
        means[key] = float(np.mean(values)) if values else 0.0
    return found, means


def slice_metrics(
    confusion: NDArray[np.int64],
    ids: NDArray[np.int64],
    *,
    labels: tuple[NDArray, NDArray] | None = None,
    spacing: Sequence[float] | None = None,
) -> list[dict[str, object]]:
    """The ``per_slice`` entries of :func:`evaluate`, from the counts of each slice.

    Parameters
    ----------
    confusion : ndarray of int64, shape (Z, k, k)
        Counts per slice along Z (:func:`~napari_segtool.metrics.slice_confusion`).
    ids : ndarray of int64, shape (k,)
        The sorted label ids of the rows and columns.
    labels : tuple of two ndarrays of int, optional
        ``(pred, ref)``: the same ``Z`` slices of both label images. With them each entry
        also gets the slice's own 2D ``hd``, ``hd95`` and ``assd`` (:func:`class_distances`
        of the slice's classes).
    spacing : sequence of float, optional
        In-plane voxel size ``(y, x)`` of those distances.

    Returns
    -------
    list of dict
        One per slice: the keys of :func:`~napari_segtool.metrics.overlap_metrics` but
        ``per_class`` (then the distances, with ``labels``).

    Examples
    --------
    >>> cm = np.array([[[2, 0], [0, 2]], [[3, 1], [0, 0]]])
    >>> [round(e["dice"], 3) for e in slice_metrics(cm, np.array([0, 1]))]
    [1.0, 0.0]
    """
    entries = []
    for z, cm in enumerate(confusion):
        entry = overlap_metrics(confusion=cm, ids=ids)
        per_class: dict[int, object] = entry.pop("per_class")  # type: ignore[assignment]
        if labels is not None:  # 2D distances of the slice, as evaluate's of a volume
            pred, ref = labels
            entry.update(class_distances(pred[z], ref[z], per_class, spacing=spacing)[1])
        entries.append(entry)
    return entries
