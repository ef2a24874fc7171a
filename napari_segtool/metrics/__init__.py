"""Segmentation metrics in pure numpy/scipy: overlap, surface distances, objects, live tracking."""

from napari_segtool.metrics.instances import instance_metrics
from napari_segtool.metrics.overlap import (
    class_metrics,
    compact_confusion,
    confusion_matrix,
    label_ids,
    overlap_metrics,
)
from napari_segtool.metrics.report import SUMMARY_KEYS, evaluate
from napari_segtool.metrics.surface import hausdorff_distance, surface_distances, surface_metrics
from napari_segtool.metrics.tracker import ConfusionTracker, slice_confusion, tracked_ids

__all__ = [
    "SUMMARY_KEYS",
    "ConfusionTracker",
    "class_metrics",
    "compact_confusion",
    "confusion_matrix",
    "evaluate",
    "hausdorff_distance",
    "instance_metrics",
    "label_ids",
    "overlap_metrics",
    "slice_confusion",
    "surface_distances",
    "surface_metrics",
    "tracked_ids",
]
