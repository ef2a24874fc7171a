"""The Segment widget's output layers: the metadata it writes on them, and reading them back.

A prediction layer carries :data:`CHECKSUM_KEY` (a fingerprint of the data as written, to
tell whether the user edited it since), :data:`ORIGINAL_KEY` (a frozen copy of the
prediction: the Review widget's baseline, what Fine-tune counts corrections against) and
:data:`SOURCE_KEY` (the model that made it). :func:`previous_outputs` finds the last machine
outputs of an image again, for a region run to keep outside its box.
"""

from __future__ import annotations

import zlib

import napari
import napari.layers
import numpy as np

from napari_segtool.layer_roles import ROLE_KEY, UNCERTAINTY

CHECKSUM_KEY = "segtool_checksum"
ORIGINAL_KEY = "segtool_original"  # frozen copy of the prediction: the Review widget's baseline
SOURCE_KEY = "segtool_source"


def checksum(data: np.ndarray) -> int:
    """Cheap fingerprint of a layer's data, to tell whether the user edited it since."""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1))


def write_uncertainty_layer(
    viewer: napari.viewer.Viewer,
    name: str,
    data: np.ndarray,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
) -> None:
    """Update the Image layer ``name`` with ``data``, or add it below every Labels layer.

    The uncertainty (magma, 0-1, additive, 60 % opacity) sits just under the lowest Labels
    layer, so it tints the image but never covers the labels being corrected.
    """
    layers = viewer.layers
    if name in layers and isinstance(layers[name], napari.layers.Image):
        layers[name].data = data
        return
    layer = viewer.add_image(
        data, name=name, scale=scale, translate=translate, colormap="magma",
        contrast_limits=(0.0, 1.0), blending="additive", opacity=0.6, visible=True,
        metadata={ROLE_KEY: UNCERTAINTY},
    )  # fmt: skip
    labels_at = [i for i, lyr in enumerate(layers) if isinstance(lyr, napari.layers.Labels)]
    if labels_at and labels_at[0] < layers.index(layer):
        layers.move(layers.index(layer), labels_at[0])


def previous_outputs(
    viewer: napari.viewer.Viewer, name: str, shape: tuple[int, ...]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What a region's outputs keep outside the box: image ``name``'s last machine prediction
    (the frozen baseline, never the user's edits) and uncertainty, where they fit ``shape``."""
    by_name = {layer.name: layer for layer in viewer.layers}
    labels = unc = None
    pred = by_name.get(f"{name} prediction")
    if isinstance(pred, napari.layers.Labels):
        original = pred.metadata.get(ORIGINAL_KEY)
        if isinstance(original, np.ndarray) and original.shape == shape:
            labels = original
        elif (
            isinstance(pred.data, np.ndarray)
            and pred.data.shape == shape
            and (pred.metadata.get(CHECKSUM_KEY) == checksum(pred.data))
        ):
            labels = pred.data.copy()  # unedited, without a baseline: its data
    found = by_name.get(f"{name} uncertainty")
    if (
        isinstance(found, napari.layers.Image)
        and isinstance(found.data, np.ndarray)
        and (found.data.shape == shape)
    ):
        unc = found.data
    return labels, unc
