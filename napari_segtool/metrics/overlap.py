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

OVERLAP_KEYS = ("dice", "iou", "precision", "recall", "specificity", "voe", "rvd")


def check_pair(pred: NDArray, ref: NDArray) -> None:
    """Raise :class:`InputError` unless both are same-shape integer label images."""
    if pred.shape != ref.shape:
        raise InputError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    for name, arr in (("prediction", pred), ("reference", ref)):
        if arr.dtype.kind not in "biu":
            raise InputError(f"{name} must be an integer or boolean label image, not {arr.dtype}")
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise InputError(f"{name} has negative labels")


def confusion_matrix(
    pred: NDArray, ref: NDArray, n_classes: int | None = None
) -> NDArray[np.int64]:
    """``M[r, p]`` = number of voxels with reference class ``r`` and predicted class ``p``.

    Examples
    --------
    >>> import numpy as np
    >>> confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    array([[1, 0, 0],
           [0, 1, 0],
           [0, 1, 1]])
    """
    check_pair(pred, ref)
    p = pred.reshape(-1).astype(np.int64, copy=False)
    r = ref.reshape(-1).astype(np.int64, copy=False)
    k = int(max(p.max(initial=0), r.max(initial=0))) + 1
    k = max(k, n_classes or 0)
    return np.bincount(r * k + p, minlength=k * k).reshape(k, k)


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


def overlap_metrics(
    pred: NDArray | None = None,
    ref: NDArray | None = None,
    *,
    confusion: NDArray[np.int64] | None = None,
    classes: Sequence[int] | None = None,
) -> dict[str, object]:
    """All overlap metrics for a label image pair (or a confusion matrix).

    Parameters
    ----------
    pred, ref : ndarray of int or bool
        Label images of the same shape (0 = background).
    confusion : ndarray, optional
        A confusion matrix from :func:`confusion_matrix` instead of the images.
    classes : sequence of int, optional
        Foreground classes to report; default: every class > 0 present in either image.

    Returns
    -------
    dict
        ``pixel_accuracy``, ``mean_pixel_accuracy``, the macro means of
        ``dice, iou, precision, recall, specificity, voe, rvd`` over ``classes``, and
        ``per_class`` (class id -> the same seven keys).
    """
    cm = confusion if confusion is not None else confusion_matrix(pred, ref)  # type: ignore[arg-type]
    counts = counts_from_confusion(cm)
    total = int(cm.sum())
    ref_sizes = cm.sum(1)
    pred_sizes = cm.sum(0)
    if classes is None:
        classes = [c for c in range(1, cm.shape[0]) if ref_sizes[c] or pred_sizes[c]]
    per_class = {}
    for c in classes:
        if c < cm.shape[0]:
            per_class[int(c)] = class_metrics(*(counts[k][c] for k in ("tp", "fp", "fn", "tn")))
        else:
            per_class[int(c)] = class_metrics(0, 0, 0, total)
    present = [c for c in range(cm.shape[0]) if ref_sizes[c]]
    result: dict[str, object] = {
        "pixel_accuracy": float(np.trace(cm) / total) if total else 1.0,
        "mean_pixel_accuracy": (
            float(np.mean([cm[c, c] / ref_sizes[c] for c in present])) if present else 1.0
        ),
    }
    for key in OVERLAP_KEYS:
        values = [m[key] for m in per_class.values()]
        default = 0.0 if key in ("voe", "rvd") else 1.0
        result[key] = float(np.mean(values)) if values else default
    result["per_class"] = per_class
    return result
