"""Segment a box only: a Shapes rectangle or the field of view, lazily or in memory."""

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_segtool import config as segtool_config
from napari_segtool._widgets import segment as segment_module
from napari_segtool._widgets.segment import SegmentWidget
from napari_segtool.config import InferenceConfig
from napari_segtool.inference import predict
from napari_segtool.inference.blocks import subsample_range
from napari_segtool.inference.normalize import percentile_range
from napari_segtool.inference.predict import segment
from napari_segtool.io.project import Project, default_project_dir
from napari_segtool.io.zarr_io import write_ome_zarr
from napari_segtool.model import load_model

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
MODEL = "em-membranes-2d"


@pytest.fixture
def em():
    return tifffile.imread(SAMPLE / "isbi2012_em.tif")[:6, 100:196, 200:296]


@pytest.fixture
def segment_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    assert isinstance(widget, SegmentWidget)
    widget._model.value = MODEL
    widget._tile.value = "64, 64"
    widget._precision.value = "fp32"  # "auto" may pick bf16 by timing: not reproducible
    widget._compile.value = "off"
    return viewer, widget


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(segment_module, "show_error", shown.append)
    return shown


def run(qtbot, widget):
    worker = widget.start()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)


def reference(widget, crop, value_range):
    config = InferenceConfig(tile_shape=(64, 64), tta=True, precision="fp32", compile="off",
                             device=str(widget._device.value))  # fmt: skip
    return segment(crop, load_model(MODEL), config=config, value_range=value_range)


def to_data(world, layer):
    """World coordinates -> the layer's data coordinates, from its scale and translate."""
    return (np.asarray(world, float) - np.asarray(layer.translate)) / np.asarray(layer.scale)


def rectangle(y0, x0, y1, x1, z=None):
    corners = [(y0, x0), (y0, x1), (y1, x1), (y1, x0)]
    return np.array([c if z is None else (z, *c) for c in corners], float)


def test_a_rectangle_on_a_lazy_image_writes_exactly_its_box(segment_widget, em, tmp_path,
                                                            monkeypatch, qtbot):  # fmt: skip
    pytest.importorskip("napari_ome_zarr")
    monkeypatch.setattr(segtool_config, "LAZY_SEGMENT_VOXELS", 1000)
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 96 * 96)
    viewer, widget = segment_widget
    path = write_ome_zarr(tmp_path / "em.ome.zarr", em, spacing=(2.0, 0.5, 0.5),
                          chunks=(1, 64, 64))  # fmt: skip
    [image] = viewer.open(str(path), plugin="napari-ome-zarr")
    # a 2D Shapes layer over the stack: its rectangle takes every Z
    corner0, corner1 = (12.0, 9.8), (40.2, 30.0)
    shapes = viewer.add_shapes([rectangle(*corner0, *corner1)], shape_type="rectangle")
    widget._image.value = image
    widget._region.value = "Shapes rectangle"
    assert not widget._shapes._explicitly_hidden  # (.visible is Qt's: False while hidden)
    widget._shapes.value = shapes
    run(qtbot, widget)
    lo, hi = to_data((0.0, *corner0), image)[1:], to_data((0.0, *corner1), image)[1:]
    yx = [slice(math.ceil(a), math.floor(b) + 1) for a, b in zip(lo, hi, strict=True)]
    box = (slice(0, 6), *yx)
    assert box[1].stop - box[1].start > 20
    assert box[2].stop - box[2].start > 20

    state = Project(default_project_dir(path)).load()
    whole = subsample_range(em, load_model(MODEL).normalization)
    assert state.image["value_range"] == pytest.approx([whole[0][0], whole[1][0]])
    ref = reference(widget, em[box], whole)
    labels = viewer.layers[f"{image.name} prediction"].data[:]
    assert labels.shape == em.shape
    np.testing.assert_array_equal(labels[box], ref.labels)
    assert 0.05 < ref.labels.mean() < 0.6
    outside = np.ones(em.shape, bool)
    outside[box] = False
    assert (labels[outside] == 0).all()
    assert (state.machine[:][outside] == 0).all()
    unc = np.asarray(viewer.layers[f"{image.name} uncertainty"].data)
    np.testing.assert_allclose(unc[box], ref.uncertainty, atol=1e-4)
    assert (unc[outside] == 0).all()


def test_a_rectangle_in_memory_fills_a_full_size_layer_and_spares_edits(segment_widget, em,
                                                                        qtbot):  # fmt: skip
    viewer, widget = segment_widget
    image = viewer.add_image(em, name="cells", scale=(2.0, 0.5, 0.5), translate=(4.0, 3.0, 1.0))
    # a 3D Shapes layer: each rectangle lies on the slice it was drawn on
    shapes = viewer.add_shapes(
        [rectangle(8.0, 11.0, 28.0, 36.0, z=8.0), rectangle(20.0, 5.0, 45.0, 30.0, z=12.0)],
        shape_type="rectangle", ndim=3,
    )  # fmt: skip
    shapes.selected_data = {1}  # the selected rectangle, not the first
    widget._image.value = image
    widget._region.value = "Shapes rectangle"
    widget._shapes.value = shapes
    run(qtbot, widget)
    # world (z 12, y 20..45, x 5..30) -> voxels z 4, y 34..84, x 8..58
    box1 = (slice(4, 5), slice(34, 85), slice(8, 59))
    whole = percentile_range(em, load_model(MODEL).normalization)
    ref1 = reference(widget, em[box1], whole)
    layer = viewer.layers["cells prediction"]
    assert layer.data.shape == em.shape
    assert tuple(layer.scale) == (2.0, 0.5, 0.5)
    outside = np.ones(em.shape, bool)
    outside[box1] = False
    np.testing.assert_array_equal(layer.data[box1], ref1.labels)
    assert (layer.data[outside] == 0).all()
    assert ref1.labels.any()
    unc = viewer.layers["cells uncertainty"].data
    assert unc.shape == em.shape
    assert (unc[outside] == 0).all()

    # unedited: the same layer takes the next box, and keeps the first
    shapes.selected_data = set()  # then the first rectangle: z 8 -> slice 2
    run(qtbot, widget)
    box0 = (slice(2, 3), slice(10, 51), slice(20, 71))
    ref0 = reference(widget, em[box0], whole)
    assert "cells prediction [1]" not in viewer.layers
    assert viewer.layers["cells prediction"] is layer
    np.testing.assert_array_equal(layer.data[box0], ref0.labels)
    np.testing.assert_array_equal(layer.data[box1], ref1.labels)
    outside[box0] = False
    assert (layer.data[outside] == 0).all()
    assert (viewer.layers["cells uncertainty"].data[box1] > 0).any()  # kept, too

    # edited: the user's layer stays as it is; the new box goes into a new layer
    layer.data[4, 40, 10] = 7
    layer.refresh()
    edited = layer.data.copy()
    shapes.selected_data = {1}
    run(qtbot, widget)
    np.testing.assert_array_equal(layer.data, edited)
    new = viewer.layers["cells prediction [1]"]
    np.testing.assert_array_equal(new.data[box1], ref1.labels)
    np.testing.assert_array_equal(new.data[box0], ref0.labels)  # the machine's, not the edit
    assert (new.data[outside] == 0).all()


def test_the_field_of_view_is_the_box_the_camera_shows(segment_widget, em):
    viewer, widget = segment_widget
    image = viewer.add_image(em, name="cells", scale=(2.0, 0.5, 0.5), translate=(4.0, 3.0, 1.0))
    widget._image.value = image
    widget._region.value = "field of view"
    assert widget._shapes._explicitly_hidden
    viewer.dims.set_current_step(0, 3)
    viewer.scene.camera.center = (0.0, 20.0, 30.0)
    viewer.scene.camera.zoom = 4 * max(viewer.canvas.size) / 48  # a quarter of the image's width
    height, width = viewer.canvas.size
    assert min(height, width) > 0
    zoom = viewer.scene.camera.zoom
    lo = to_data((0.0, 20.0 - height / (2 * zoom), 30.0 - width / (2 * zoom)), image)
    hi = to_data((0.0, 20.0 + height / (2 * zoom), 30.0 + width / (2 * zoom)), image)
    # every voxel the canvas shows part of: voxel i covers [i - 0.5, i + 0.5]
    expected = (slice(0, 6), *(
        slice(max(0, math.floor(a + 0.5)), min(96, math.ceil(b + 0.5)))
        for a, b in zip(lo[1:], hi[1:], strict=True)
    ))  # fmt: skip
    box = widget._region_box(image)
    assert box == expected
    assert 0 < box[1].start < box[1].stop < 96  # zoomed in: a part of the image
    assert 0 < box[2].start < box[2].stop < 96
    job = widget._collect_config()
    assert job.region == expected


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no shapes", "no Shapes layer"),
        ("ellipse", "holds no rectangle"),
        ("far away", "lies outside"),
        ("3D view", "2D view"),
        ("panned away", "lies outside"),
    ],
)
def test_bad_regions_notify_and_run_nothing(segment_widget, em, errors, setup, message):
    viewer, widget = segment_widget
    image = viewer.add_image(em[:, :40, :40], name="cells")
    widget._image.value = image
    widget._region.value = "field of view" if setup in ("3D view", "panned away") else (
        "Shapes rectangle"
    )  # fmt: skip
    if setup == "ellipse":
        viewer.add_shapes([rectangle(2, 2, 20, 20)], shape_type="ellipse")
    elif setup == "far away":
        viewer.add_shapes([rectangle(100, 100, 120, 130)], shape_type="rectangle")
    elif setup == "3D view":
        viewer.dims.ndisplay = 3
    elif setup == "panned away":
        viewer.scene.camera.center = (0.0, 500.0, 500.0)
        viewer.scene.camera.zoom = 10.0
    assert widget.start() is None
    assert widget.worker is None
    assert message in errors[-1]
    assert "cells prediction" not in viewer.layers
