import numpy as np
import pytest

from napari_segtool._widgets import queue as queue_module
from napari_segtool._widgets.queue import REVIEWED_KEY, QueueWidget


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(queue_module, "show_error", shown.append)
    return shown


def _stack_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = np.zeros((8, 32, 32), np.uint8)
    labels[:, 8:24, 8:24] = 1
    unc = np.zeros((8, 32, 32), np.float32)
    for z, level in enumerate([0.1, 0.9, 0.2, 0.8, 0.05, 0.7, 0.3, 0.6]):
        unc[z] = level
    viewer.add_labels(labels, name="pred")
    viewer.add_image(unc, name="unc")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Queue")
    assert isinstance(widget, QueueWidget)
    widget._labels.value = viewer.layers["pred"]
    widget._uncertainty.value = viewer.layers["unc"]
    return viewer, widget


def test_ranks_slices_and_jumps_there(make_napari_viewer):
    viewer, widget = _stack_viewer(make_napari_viewer)
    widget._gap.value = 0
    assert [u.index for u in widget.queue[:4]] == [1, 3, 5, 7]
    assert widget.table.rowCount() == 8
    assert widget.table.item(0, 0).text() == "slice 1"
    widget.jump_to(1)
    assert viewer.dims.current_step[0] == 3


def test_reviewed_slices_leave_and_new_uncertainty_refreshes(make_napari_viewer):
    viewer, widget = _stack_viewer(make_napari_viewer)
    widget._gap.value = 0
    viewer.layers["pred"].metadata[REVIEWED_KEY] = {1, 3}
    widget.refresh()
    assert [u.index for u in widget.queue[:2]] == [5, 7]
    assert all(u.index not in {1, 3} for u in widget.queue)
    new = np.zeros((8, 32, 32), np.float32)
    new[0] = 1.0
    viewer.layers["unc"].data = new  # as after a new Segment run: no click needed
    assert widget.queue[0].index == 0


def test_tiles_of_a_2d_image(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = np.ones((200, 300), np.uint8)
    unc = np.zeros((200, 300), np.float32)
    unc[100:200, 200:300] = 1
    viewer.add_labels(labels, name="pred")
    viewer.add_image(unc, name="unc")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Queue")
    widget._tile.value = 100
    widget._labels.value = viewer.layers["pred"]
    widget._uncertainty.value = viewer.layers["unc"]
    assert widget.queue[0].grid == (1, 2)
    widget.jump_to(0)
    assert np.allclose(viewer.scene.camera.center[-2:], (150, 250))


def test_missing_uncertainty_is_a_notification(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="pred")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Queue")
    widget._labels.value = viewer.layers["pred"]
    assert widget.refresh() == []
    assert "segment with flip TTA first" in errors[-1]
    widget._strategy.value = "random"
    assert len(widget.refresh()) == 3
