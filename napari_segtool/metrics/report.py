"""One call for every metric of a label-image pair: what the CLI and the Review widget show."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from napari_segtool.metrics.overlap import check_pair, compact_confusion, overlap_metrics
from napari_segtool.metrics.surface import surface_metrics
from napari_segtool.metrics.tracker import slice_confusion

SUMMARY_KEYS = (
    "dice", "iou", "pixel_accuracy", "mean_pixel_accuracy", "precision", "recall",
    "specificity", "voe", "rvd", "hd", "hd95", "assd",
)  # fmt: skip


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
        Compute ``hd``, ``hd95`` and ``assd`` (the costly part) per foreground class.
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
        for key in ("hd", "hd95", "assd"):
            values = [entry[key] for entry in per_class.values()]
            result[key] = float(np.mean(values)) if values else 0.0
    else:
        for key in ("hd", "hd95", "assd"):
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
