"""Tiled inference: sliding windows with Gaussian blending, on 2D images and 3D stacks."""

from napari_segtool.inference.predict import (
    Progress,
    Segmentation,
    iter_segment,
    resolve_device,
    segment,
)
from napari_segtool.inference.tiling import blend_weights, iter_sliding_window, sliding_window

__all__ = [
    "Progress",
    "Segmentation",
    "blend_weights",
    "iter_segment",
    "iter_sliding_window",
    "resolve_device",
    "segment",
    "sliding_window",
]
