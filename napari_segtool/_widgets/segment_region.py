"""The Segment widget's region: the box of an image to segment, and the outputs around it.

The Segment dock segments the whole image, the box the 2D canvas shows
(:func:`field_of_view`) or the box of a Shapes rectangle (:func:`rectangle`), in the image's
level-0 voxels; :func:`region_box` picks one by the choice in the dock's
:class:`RegionChoice`. The crop's outputs go back into whole-image arrays with :func:`place`.
"""

from __future__ import annotations

import math

import napari
import napari.layers
import numpy as np
from magicgui.widgets import ComboBox, create_widget

from napari_segtool._widgets.segment_lazy import level0
from napari_segtool.config import SEGMENT_REGIONS
from napari_segtool.errors import InputError

WHOLE, FIELD_OF_VIEW, RECTANGLE = SEGMENT_REGIONS
Box = tuple[slice, ...]


class RegionChoice:
    """The dock's region controls: which region, and the Shapes layer of a rectangle.

    Attributes
    ----------
    mode : ComboBox
        One of :data:`~napari_segtool.config.SEGMENT_REGIONS`.
    shapes : magicgui layer picker
        The Shapes layer holding the rectangle (None: the selected layer); shown only while
        ``mode`` is the Shapes rectangle.
    """

    def __init__(self) -> None:
        self.mode = ComboBox(label="region", choices=SEGMENT_REGIONS, value=WHOLE)
        self.shapes = create_widget(annotation="napari.layers.Shapes", label="rectangle in",
                                    options={"nullable": True})  # fmt: skip
        self.shapes.visible = False
        self.mode.tooltip = (
            "whole image; field of view: the Y/X box the canvas shows now (2D view), through "
            "all Z of a stack; Shapes rectangle: the box of the selected (else the first) "
            "rectangle of the Shapes layer below, on its own Z slice if it was drawn on a slice "
            "of a stack, through all Z if the Shapes layer is 2D. The box is normalised like "
            "the whole image; outside it the prediction keeps its values (0 in a new layer)"
        )
        self.shapes.tooltip = "Shapes layer holding the rectangle (default: the selected layer)"
        self.mode.changed.connect(self._on_mode_changed)

    def _on_mode_changed(self, value: str) -> None:
        self.shapes.visible = value == RECTANGLE

    def box(self, viewer: napari.viewer.Viewer, layer: napari.layers.Image) -> Box | None:
        """The chosen region of ``layer`` (:func:`region_box`); None for the whole image."""
        return region_box(viewer, layer, self.mode.value, self.shapes.value)


def voxel_range(lo: float, hi: float, n: int, *, touching: bool) -> slice:
    """The voxels of an axis of ``n`` (voxel ``i`` centred at ``i``) that ``[lo, hi]`` holds.

    Those whose centre lies inside, or with ``touching`` every one it overlaps; clipped to
    ``0:n`` (``start >= stop`` when none).

    Examples
    --------
    >>> voxel_range(-0.5, 9.5, 10, touching=False), voxel_range(2.2, 5.6, 10, touching=True)
    (slice(0, 10, None), slice(2, 7, None))
    >>> voxel_range(2.2, 5.6, 10, touching=False), voxel_range(11.0, 12.0, 10, touching=True)
    (slice(3, 6, None), slice(10, 10, None))
    """
    if touching:
        start, stop = math.floor(lo + 0.5), math.ceil(hi + 0.5)
    else:
        start, stop = math.ceil(lo - 1e-6), math.floor(hi + 1e-6) + 1
    return slice(min(max(start, 0), n), min(max(stop, 0), n))


def describe_region(box: Box) -> str:
    """``"2:5,0:40,10:64"``: a box as ``segment --region`` writes it."""
    return ",".join(f"{s.start}:{s.stop}" for s in box)


def place(crop: np.ndarray, region: Box, *, shape: tuple[int, ...],
          base: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """A new array of ``shape``: ``base`` (or zeros) with ``crop`` at ``region``."""
    if base is None:
        out = np.zeros(shape, crop.dtype)
    else:
        out = np.array(base, dtype=np.promote_types(base.dtype, crop.dtype))
    out[region] = crop
    return out


def region_box(
    viewer: napari.viewer.Viewer,
    layer: napari.layers.Image,
    mode: str,
    shapes: napari.layers.Shapes | None = None,
) -> Box | None:
    """The box of ``layer``'s (level-0) voxels to segment, or None for the whole image.

    ``mode`` is one of :data:`~napari_segtool.config.SEGMENT_REGIONS`; ``shapes`` holds the
    rectangle (default: the viewer's selected layer, if it is a Shapes layer). Raises
    :class:`~napari_segtool.errors.InputError` where the region is not there or misses the
    image.
    """
    if mode == WHOLE:
        return None
    shape = tuple(int(n) for n in level0(layer).shape[: layer.ndim])
    if mode == FIELD_OF_VIEW:
        box, what = field_of_view(viewer, layer, shape), "the field of view"
    else:
        box, what = rectangle(viewer, layer, shape, shapes)
    if any(s.start >= s.stop for s in box):
        raise InputError(
            f"{what} lies outside '{layer.name}' (shape {shape}): pan or zoom onto the "
            "image, or choose 'whole image'"
        )
    return box


def field_of_view(
    viewer: napari.viewer.Viewer, layer: napari.layers.Image, shape: tuple[int, ...]
) -> Box:
    """The voxels the 2D canvas shows (from the camera and the canvas size); all Z."""
    if viewer.dims.ndisplay != 2:
        raise InputError(
            "the field of view is that of a 2D view: switch the viewer to 2D (the 2D/3D "
            "button), or draw a Shapes rectangle and choose 'Shapes rectangle'"
        )
    height, width = (float(v) for v in viewer.canvas.size)
    zoom = float(viewer.scene.camera.zoom)
    if min(height, width) <= 0 or zoom <= 0:
        raise InputError("the canvas has no size yet: show the viewer, then segment again")
    cy, cx = (float(v) for v in viewer.scene.camera.center[-2:])
    ay, ax = viewer.dims.displayed[-2:]
    point = np.asarray(viewer.dims.point, float)
    corners = []
    for y in (cy - height / (2 * zoom), cy + height / (2 * zoom)):
        for x in (cx - width / (2 * zoom), cx + width / (2 * zoom)):
            world = point.copy()
            world[ay], world[ax] = y, x
            corners.append(layer.world_to_data(world))
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    offset = viewer.dims.ndim - layer.ndim
    shown = {ay - offset, ax - offset}
    return tuple(
        voxel_range(lo[i], hi[i], n, touching=True) if i in shown else slice(0, n)
        for i, n in enumerate(shape)
    )


def rectangle(
    viewer: napari.viewer.Viewer,
    layer: napari.layers.Image,
    shape: tuple[int, ...],
    shapes: napari.layers.Shapes | None = None,
) -> tuple[Box, str]:
    """The box of a Shapes rectangle in ``layer``'s voxels (centres inside), and its name.

    The rectangle is the selected (else the first) one of ``shapes`` (default: the viewer's
    selected layer, if it is a Shapes layer). Axes the rectangle spans take the voxels whose
    centres it holds; an axis of the Shapes layer on which it is flat (the slice it was
    drawn on) takes that one slice; axes the Shapes layer lacks (a 2D layer over a stack)
    are taken whole.
    """
    active = viewer.layers.selection.active
    if shapes is None and isinstance(active, napari.layers.Shapes):
        shapes = active
    if shapes is None:
        raise InputError(
            "no Shapes layer: add one (the polygon button above the layer list), draw a "
            "rectangle, then segment again; or choose another region"
        )
    rects = [i for i, kind in enumerate(shapes.shape_type) if kind == "rectangle"]
    if not rects:
        raise InputError(
            f"'{shapes.name}' holds no rectangle: draw one with its rectangle tool (R)"
        )
    selected = sorted(i for i in shapes.selected_data if i in rects)
    index = selected[0] if selected else rects[0]
    world = [shapes.data_to_world(v) for v in np.asarray(shapes.data[index], float)]
    k = min(layer.ndim, shapes.ndim)
    point = np.asarray(viewer.dims.point, float)[-layer.ndim :]
    corners = []
    for w in world:
        full = point.copy()
        full[-k:] = np.asarray(w, float)[-k:]
        corners.append(layer.world_to_data(full))
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    box, spanned = [], 0
    for i, n in enumerate(shape):
        if i < layer.ndim - k:
            box.append(slice(0, n))
        elif hi[i] - lo[i] > 1e-6 * max(1.0, abs(lo[i])):
            box.append(voxel_range(lo[i], hi[i], n, touching=False))
            spanned += 1
        else:  # flat along this axis: the slice it was drawn on
            z = round(float(lo[i]))
            box.append(slice(min(max(z, 0), n), min(max(z + 1, 0), n)))
    what = f"rectangle {index} of '{shapes.name}'"
    if spanned < min(2, layer.ndim):
        raise InputError(f"{what} has no area in '{layer.name}': draw it again, larger")
    return tuple(box), what
