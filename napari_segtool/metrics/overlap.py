"""Overlap metrics from confusion counts: Dice, IoU, precision, recall and the rest.

All metrics here are functions of the per-class confusion counts, so the incremental tracker
(which keeps counts up to date while the user paints) gives exactly the same numbers as a
full recomputation.

Definitions, for class ``c`` with predicted mask ``P`` and reference mask ``R`` over ``N``
voxels, ``TP = |P & R|``, ``FP = |P & ~R|``, ``FN = |~P & R|``, ``TN = N - TP - FP - FN``:

- Dice (F1) ``2 TP / (2 TP + FP + FN)``; IoU (Jaccard) ``TP / (TP + FP + FN)``;
- precision ``TP / (TP + FP)``; recall (sensitivity) ``TP / (TP + FN)``;
  specificity ``TN / (TN + FP)``;
- volume overlap error ``VOE = 1 - IoU``;
- relative volume difference ``RVD = (|P| - |R|) / |R|``, **signed**: positive when the
  prediction is larger than the reference;
- pixel accuracy: the share of all voxels whose class is right (over all classes);
  mean pixel accuracy: the mean over classes present in the reference of ``TP / |R|``
  (class-wise recall, background included; Long et al. 2015).

Empty-mask policy (a zero denominator):

- both masks empty: Dice = IoU = precision = recall = 1, VOE = RVD = 0: nothing to find and
  nothing found is perfect agreement;
- reference empty, prediction not: Dice = IoU = precision = 0, recall = 1 (nothing missed),
  RVD = +inf;
- prediction empty, reference not: Dice = IoU = recall = 0, precision = 1 (no false
  positives), RVD = -1;
- specificity with no negative voxel in the reference (``TN + FP = 0``) is 1.

Macro means average over the foreground classes present in the reference or the prediction;
classes absent from both are left out (their perfect 1.0 would flatter the mean). With no
foreground at all the macro Dice is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.memory import check_allocation

OVERLAP_KEYS = ("dice", "iou", "precision", "recall", "specificity", "voe", "rvd")


# Label images whose values span fewer ids than this are mapped to compact indices through a
# lookup table; wider ranges (TotalSegmentator-style ids, a stray 65535, int64 ids) by search.
_LUT_RANGE = 1 << 20


def check_pair(pred: NDArray, ref: NDArray, *, values: bool = True) -> None:
    """Raise :class:`InputError` unless both are same-shape integer label images.

    ``values=False`` checks the shapes and dtypes only, without a pass over the voxels (for
    lazy zarr or dask arrays, whose blocks are checked as they are read).
    """
    if pred.shape != ref.shape:
        raise InputError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    for name, arr in (("prediction", pred), ("reference", ref)):
        if arr.dtype.kind not in "biu":
            raise InputError(f"{name} must be an integer or boolean label image, not {arr.dtype}")
        if not values:
            continue
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise InputError(f"{name} has negative labels")
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InputError(f"{name} has label ids above 2**63 - 1 ({arr.max()})")


def _ids_of(arr: NDArray) -> NDArray[np.int64]:
    """Sorted distinct values of a non-negative label image, cheaply for small ranges."""
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)  # index with the values, not as a mask
    hi = int(arr.max())
    if hi < _LUT_RANGE:
        flat = arr.reshape(-1)
        seen = np.zeros(hi + 1, bool)
        for start in range(0, flat.size, 1 << 22):  # chunks: no image-sized intp copy
            seen[flat[start : start + (1 << 22)]] = True
        return np.flatnonzero(seen).astype(np.int64)
    return np.unique(arr).astype(np.int64)


def label_ids(*arrays: NDArray) -> NDArray[np.int64]:
    """Sorted label ids occurring in any of the arrays, background 0 always included.

    Confusion counts are indexed by position in this list, so their size follows the number
    of classes that occur, not the largest id (one voxel of 65535 costs one row, not 65535).

    Examples
    --------
    >>> label_ids(np.array([0, 5, 5]), np.array([117, 5, 0]))
    array([  0,   5, 117])
    >>> label_ids(np.array([3]))
    array([0, 3])
    """
    parts = [_ids_of(a) for a in arrays]
    return np.union1d(np.zeros(1, np.int64), np.concatenate(parts) if parts else [])


def label_index(arr: NDArray, ids: NDArray[np.int64]) -> NDArray[np.intp]:
    """Position of each value of ``arr`` in the sorted ``ids`` (every value must be there).

    >>> label_index(np.array([[0, 117], [5, 5]]), np.array([0, 5, 117]))
    array([[0, 2],
           [1, 1]])
    """
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if ids.size and int(ids[-1]) < _LUT_RANGE:
        lut = np.zeros(int(ids[-1]) + 1, np.intp)
        lut[ids] = np.arange(ids.size)
        return lut[arr]
    return np.searchsorted(ids, arr).astype(np.intp, copy=False)


def compact_confusion(
    pred: NDArray, ref: NDArray, *, ids: NDArray[np.int64] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Confusion counts over the label ids that occur: ``(ids, M)``.

    ``M[i, j]`` is the number of voxels whose reference id is ``ids[i]`` and predicted id
    ``ids[j]``; ``ids`` (from :func:`label_ids`, 0 first) are the real label ids, so sparse
    ids such as TotalSegmentator's keep their numbers while the table stays small.

    Parameters
    ----------
    pred, ref : ndarray of int or bool
        Label images of the same shape.
    ids : ndarray of int64, optional
        Sorted ids to count over (a superset of the ids that occur); default: those that occur.

    Raises
    ------
    InputError
        If the table would not fit in the available memory (many thousands of distinct ids,
        as in an instance segmentation: use :func:`~napari_segtool.metrics.instance_metrics`).

    Examples
    --------
    >>> ids, cm = compact_confusion(np.array([0, 5, 5, 65535]), np.array([0, 5, 0, 65535]))
    >>> ids
    array([    0,     5, 65535])
    >>> cm
    array([[1, 1, 0],
           [0, 1, 0],
           [0, 0, 1]])
    """
    check_pair(pred, ref)
    if ids is None:
        ids = label_ids(pred, ref)
    k = int(ids.size)
    check_allocation(
        k * k * 8 * 2,
        what=f"a confusion table of {k} x {k} label ids",
        hint=(
            "the images hold that many distinct ids; for instance labels (one id per object) "
            "use napari_segtool.metrics.instance_metrics"
        ),
    )
    cm = np.zeros((k, k), np.int64)
    p_flat, r_flat = pred.reshape(-1), ref.reshape(-1)
    for start in range(0, p_flat.size, 1 << 22):  # chunks bound the index temporaries
        r = label_index(r_flat[start : start + (1 << 22)], ids)
        p = label_index(p_flat[start : start + (1 << 22)], ids)
        cm += np.bincount(r * k + p, minlength=k * k).reshape(k, k)
    return ids, cm


def confusion_matrix(
    pred: NDArray, ref: NDArray, n_classes: int | None = None
) -> NDArray[np.int64]:
    """``M[r, p]`` = number of voxels with reference class ``r`` and predicted class ``p``.

    Indexed by the label value itself (size ``max id + 1``), for classes ``0 .. n-1``; label
    images with sparse or large ids should use :func:`compact_confusion`, which this refuses
    to replace when the dense table would not fit in memory.

    Examples
    --------
    >>> import numpy as np
    >>> confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    array([[1, 0, 0],
           [0, 1, 0],
           [0, 1, 1]])
    """
    ids, cm = compact_confusion(pred, ref)
    k = max(int(ids[-1]) + 1, n_classes or 0)
    check_allocation(
        k * k * 8,
        what=f"a confusion table indexed up to label id {k - 1} ({k} x {k})",
        hint="count over the ids that occur instead: napari_segtool.metrics.compact_confusion",
    )
    dense = np.zeros((k, k), np.int64)
    dense[np.ix_(ids, ids)] = cm
    return dense


def counts_from_confusion(cm: NDArray[np.int64]) -> dict[str, NDArray[np.int64]]:
    """Per-class ``tp, fp, fn, tn`` arrays (index = class) from a confusion matrix."""
    tp = np.diag(cm).astype(np.int64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: float, den: float, *, both_empty: bool, empty_value: float) -> float:
    if den > 0:
        return num / den
    return 1.0 if both_empty else empty_value


def class_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Overlap metrics of one class from its counts, with the module's empty-mask policy.

    Examples
    --------
    >>> m = class_metrics(tp=3, fp=1, fn=2, tn=4)
    >>> round(m["dice"], 4), round(m["iou"], 4), m["rvd"]
    (0.6667, 0.5, -0.2)
    >>> class_metrics(0, 0, 0, 10)["dice"]
    1.0
    """
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    n_pred, n_ref = tp + fp, tp + fn
    both_empty = n_pred == 0 and n_ref == 0
    dice = _ratio(2 * tp, 2 * tp + fp + fn, both_empty=both_empty, empty_value=0.0)
    iou = _ratio(tp, tp + fp + fn, both_empty=both_empty, empty_value=0.0)
    precision = tp / n_pred if n_pred else (1.0 if both_empty or n_ref else 0.0)
    recall = tp / n_ref if n_ref else 1.0
    specificity = tn / (tn + fp) if tn + fp else 1.0
    if n_ref:
        rvd = (n_pred - n_ref) / n_ref
    else:
        rvd = 0.0 if n_pred == 0 else float("inf")
    return {
        "dice": dice,
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "voe": 1.0 - iou,
        "rvd": rvd,
    }


def macro_dice(confusion: NDArray[np.int64]) -> NDArray[np.float64]:
    """Macro foreground Dice of one or many confusion matrices ``C[..., ref, pred]``.

    Index 0 is the background. The mean runs over the foreground classes present in either
    image; with no foreground at all the Dice is 1 (the module's policy), so it equals
    ``overlap_metrics(confusion=c)["dice"]`` for each matrix ``c``, vectorised over the
    leading axes (e.g. one matrix per slice).

    Examples
    --------
    >>> macro_dice(np.array([[[4, 0], [0, 0]], [[1, 1], [1, 1]]]))
    array([1. , 0.5])
    """
    cm = np.asarray(confusion)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)[..., 1:].astype(np.float64)
    sizes = (cm.sum(-2) + cm.sum(-1))[..., 1:]
    present = sizes > 0
    dice = np.where(present, 2 * tp / np.maximum(sizes, 1), 0.0)
    n_present = present.sum(-1)
    return np.where(n_present > 0, dice.sum(-1) / np.maximum(n_present, 1), 1.0)


def foreground_dice(pred: NDArray, ref: NDArray, n_classes: int) -> float:
    """Macro foreground Dice of two masks of class indices ``0 .. n_classes - 1``.

    Classes absent from both masks are left out; 1.0 when neither holds any foreground.

    Raises
    ------
    InputError
        For a value outside ``0 .. n_classes - 1`` (map label ids to channels first).

    Examples
    --------
    >>> foreground_dice(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    0.6666666666666666
    """
    cm = confusion_matrix(pred, ref, n_classes)
    if cm.shape[0] > n_classes:
        raise InputError(
            f"the masks hold class {cm.shape[0] - 1} but n_classes is {n_classes}; map label "
            "values to channel indices first (labels_to_channels)"
        )
    return float(macro_dice(cm))


def overlap_metrics(
    pred: NDArray | None = None,
    ref: NDArray | None = None,
    *,
    confusion: NDArray[np.int64] | None = None,
    ids: Sequence[int] | NDArray[np.int64] | None = None,
    classes: Sequence[int] | None = None,
) -> dict[str, object]:
    """All overlap metrics for a label image pair (or a confusion matrix).

    Parameters
    ----------
    pred, ref : ndarray of int or bool
        Label images of the same shape (0 = background).
    confusion : ndarray, optional
        A confusion matrix instead of the images: from :func:`compact_confusion` (pass its
        ``ids``) or indexed by class id as from :func:`confusion_matrix`.
    ids : sequence of int, optional
        The label id of each row and column of ``confusion``; default ``0, 1, ..., k-1``.
        Row 0 must be the background (id 0).
    classes : sequence of int, optional
        Foreground label ids to report; default: every id > 0 present in either image.

    Returns
    -------
    dict
        ``pixel_accuracy``, ``mean_pixel_accuracy``, the macro means of
        ``dice, iou, precision, recall, specificity, voe, rvd`` over ``classes``, and
        ``per_class`` (label id -> the same seven keys).

    Examples
    --------
    >>> m = overlap_metrics(np.array([0, 5, 5, 117]), np.array([0, 5, 0, 117]))
    >>> sorted(m["per_class"]), round(m["per_class"][5]["dice"], 4)
    ([5, 117], 0.6667)
    """
    if confusion is None:
        ids, cm = compact_confusion(pred, ref)  # type: ignore[arg-type]
    else:
        cm = confusion
    id_list = [int(v) for v in ids] if ids is not None else list(range(cm.shape[0]))
    if len(id_list) != cm.shape[0] or (id_list and id_list[0] != 0):
        raise InputError(
            f"ids {id_list[:8]} must name the {cm.shape[0]} rows of the confusion matrix, "
            "background 0 first"
        )
    position = {c: i for i, c in enumerate(id_list)}
    counts = counts_from_confusion(cm)
    total = int(cm.sum())
    ref_sizes = cm.sum(1)
    pred_sizes = cm.sum(0)
    if classes is None:
        classes = [id_list[i] for i in range(1, cm.shape[0]) if ref_sizes[i] or pred_sizes[i]]
    per_class = {}
    for c in classes:
        i = position.get(int(c))
        if i is not None:
            per_class[int(c)] = class_metrics(*(counts[k][i] for k in ("tp", "fp", "fn", "tn")))
        else:
            per_class[int(c)] = class_metrics(0, 0, 0, total)
    present = [i for i in range(cm.shape[0]) if ref_sizes[i]]
    result: dict[str, object] = {
        "pixel_accuracy": float(np.trace(cm) / total) if total else 1.0,
        "mean_pixel_accuracy": (
            float(np.mean([cm[i, i] / ref_sizes[i] for i in present])) if present else 1.0
        ),
    }
    for key in OVERLAP_KEYS:
        values = [m[key] for m in per_class.values()]
        default = 0.0 if key in ("voe", "rvd") else 1.0
        result[key] = float(np.mean(values)) if values else default
    result["per_class"] = per_class
    return result
