"""The Fine-tune widget on a chunked project: the labels layer is the project's zarr store."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_segtool._widgets import finetune as finetune_module
from napari_segtool._widgets.finetune_project import same_store
from napari_segtool._widgets.segment import write_uncertainty_layer
from napari_segtool.io.project import ChunkedState, Project
from napari_segtool.training.versions import current_model
from napari_segtool.workflows.correction import resegment_block
from napari_segtool.workflows.lazy_segment import UNCERTAINTY_STORE
from tests.training.conftest import tiny_model

SAMPLE = Path(__file__).parents[2] / "napari_segtool" / "sample_data"
REVIEWED = (1, 4, 6)


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(finetune_module, "show_error", shown.append)
    return shown


@pytest.fixture
def chunked_setup(make_napari_viewer, tmp_path):
    """A zarr EM image, a chunked project with three reviewed slices, a viewer whose labels
    layer paints into the project's store, and the Fine-tune widget pointed at them."""
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:8, :128, :128]
    truth = tifffile.imread(SAMPLE / "isbi2012_em_membranes.tif")[:8, :128, :128]
    image = zarr.create_array(tmp_path / "em.zarr", shape=em.shape, dtype=em.dtype,
                              chunks=(1, 128, 128))  # fmt: skip
    image[:] = em
    start = tiny_model().save(tmp_path / "start.pt")
    project = Project(tmp_path / "em.segtool")
    machine = (np.indices(em.shape).sum(axis=0) % 2).astype(np.uint8)
    state = project.create_chunked(labels=machine, machine=machine, chunks=(1, 64, 64),
                                   base_model=str(start), image={"name": "em"})  # fmt: skip
    for z in REVIEWED:
        state.labels[z] = truth[z]
    state.reviewed = set(REVIEWED)
    project.save(state)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    layer = viewer.add_labels(state.labels, name="em prediction")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    widget._image.value = viewer.layers["em"]
    widget._labels.value = layer
    widget._folder.value = project.folder
    widget._epochs.value = 2
    widget._steps.value = 4
    widget._lr.value = 0.01
    widget._device.value = "cpu"
    return viewer, widget, layer


def test_round_on_a_zarr_labels_layer_merges_box_by_box(chunked_setup, qtbot, errors):
    viewer, widget, layer = chunked_setup
    assert widget.open_project()
    assert isinstance(widget.state, ChunkedState)
    assert isinstance(layer.data, zarr.Array)
    assert same_store(layer.data, widget.state.labels)
    assert "em prediction before restore" not in viewer.layers  # nothing copied
    layer.brush_size = 9
    layer.paint((3, 30, 30), 1)  # through napari, into the store
    assert widget.state.painted[3].sum() > 0
    protected = widget.state.protected()
    before = np.asarray(widget.state.labels[:])
    # the starting model's uncertainty, as Segment's lazy path leaves it: a layer on the store
    old = zarr.open_array(widget.state.folder / UNCERTAINTY_STORE, mode="w",
                          shape=before.shape, chunks=(1, 64, 64), dtype="f4",
                          fill_value=0.0, zarr_format=3)  # fmt: skip
    old[:] = 0.75
    write_uncertainty_layer(viewer, "em uncertainty", old, (1.0,) * 3, (0.0,) * 3)
    unc_layer = viewer.layers["em uncertainty"]
    refreshed = []
    unc_layer.events.data.connect(lambda _: refreshed.append(unc_layer.data))
    editable = []
    layer.events.editable.connect(lambda _: editable.append(layer.editable))
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert not errors
    assert [v["version"] for v in widget.state.versions] == [1]
    if not widget.state.versions[0]["promoted"]:
        assert widget.resegment() is not None
    qtbot.waitUntil(lambda: "re-segmented" in widget._status.value, timeout=120_000)
    qtbot.waitUntil(lambda: layer.editable, timeout=10_000)
    assert editable[:2] == [False, True]  # painting was paused while the boxes merged
    assert not errors
    after = np.asarray(layer.data[:])
    assert np.array_equal(after[protected], before[protected])
    assert (after != before).any()  # the untouched checkerboard took the new prediction
    assert same_store(layer.data, widget.state.labels)
    # the uncertainty layer shows the model's map of the re-segmented boxes (the Queue
    # follows its data event); boxes not re-segmented (none here: the default box is the
    # whole 8-slice volume, which holds unlabelled voxels) keep the old one
    assert refreshed
    assert unc_layer.data is refreshed[-1]
    assert same_store(unc_layer.data, old)
    shown = np.asarray(unc_layer.data[:])
    block = resegment_block(widget.state, current_model(widget.project, widget.state))
    boxes = list(widget.state.unlabelled_boxes(block))
    assert boxes
    inside = np.zeros(shown.shape, bool)
    for box in boxes:
        inside[box] = True
        assert (shown[box] != 0.75).any()
    assert (shown[~inside] == 0.75).all()
    # the merge's save ran in a worker: the stroke and the version are on disk
    folder = widget.project.folder

    def saved() -> bool:
        on_disk = Project(folder).load()
        return bool(on_disk.painted[3].any()) and len(on_disk.versions) == 1

    qtbot.waitUntil(saved, timeout=30_000)


def test_a_lazy_labels_layer_starts_a_chunked_project(make_napari_viewer, tmp_path, errors):
    viewer = make_napari_viewer()
    image = zarr.create_array(tmp_path / "img.zarr", shape=(4, 64, 64), dtype="uint8")
    pred = zarr.create_array(tmp_path / "pred.zarr", shape=(4, 64, 64), dtype="uint8")
    pred[1, 10:20, 10:20] = 1
    viewer.add_image(image, name="img")
    layer = viewer.add_labels(pred, name="img prediction")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    widget._image.value = viewer.layers["img"]
    widget._labels.value = layer
    widget._folder.value = tmp_path / "img.segtool"
    assert widget.open_project(), errors
    assert isinstance(widget.state, ChunkedState)
    assert Project(tmp_path / "img.segtool").chunked
    assert same_store(layer.data, widget.state.labels)
    assert np.asarray(layer.data[1, 10:20, 10:20]).all()
    assert widget.state.labelled_voxels() == 0
