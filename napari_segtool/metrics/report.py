"""One call for every metric of a label-image pair: what the CLI and the Review widget show."""

from __future__ import annotations

from collections.abc import Sequence
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
        for c, entry in per_class.items():
            entry.update(surface_metrics(pred == c, ref == c, spacing=spacing))
        for key in DISTANCE_KEYS:
            values = [entry[key] for entry in per_class.values()]
            result[key] = float(np.mean(values)) if values else 0.0
    else:
        for key in DISTANCE_KEYS:
            result[key] = None
    if per_slice and pred.ndim >= 3:
        slices = slice_confusion(pred, ref, ids=ids)
        result["per_slice"] = [
            {k: v for k, v in overlap_metrics(confusion=s, ids=ids).items() if k != "per_class"}
            for s in slices
        ]
    ordered = {k: result[k] for k in SUMMARY_KEYS}
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    return ordered
