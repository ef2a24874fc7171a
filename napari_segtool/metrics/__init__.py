"""Segmentation metrics in pure numpy/scipy: overlap, surface distances, objects, live tracking."""

from napari_segtool.metrics.blockwise import (
    DISTANCE_MAX_VOXELS,
    confusion_blockwise,
    evaluate_blockwise,
)
from napari_segtool.metrics.instances import instance_metrics
from napari_segtool.metrics.overlap import (
    class_metrics,
    compact_confusion,
    confusion_matrix,
    foreground_dice,
    label_ids,
    macro_dice,
    overlap_metrics,
)
from napari_segtool.metrics.report import (
    DISTANCE_KEYS,
    METRIC,
    METRICS,
    SUMMARY_KEYS,
    Metric,
    evaluate,
)
from napari_segtool.metrics.surface import hausdorff_distance, surface_distances, surface_metrics
from napari_segtool.metrics.tracker import ConfusionTracker, slice_confusion, tracked_ids

__all__ = [
    "DISTANCE_KEYS",
    "DISTANCE_MAX_VOXELS",
    "METRIC",
    "METRICS",
    "SUMMARY_KEYS",
    "ConfusionTracker",
    "Metric",
    "class_metrics",
    "compact_confusion",
    "confusion_blockwise",
    "confusion_matrix",
    "evaluate",
    "evaluate_blockwise",
    "foreground_dice",
    "hausdorff_distance",
    "instance_metrics",
    "label_ids",
    "macro_dice",
    "overlap_metrics",
    "slice_confusion",
    "surface_distances",
    "surface_metrics",
    "tracked_ids",
]
