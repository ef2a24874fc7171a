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
    widget._strategy.value = "uncertainty"  # these tests rank by it
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
    widget._strategy.value = "uncertainty"  # these tests rank by it
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
    widget._strategy.value = "uncertainty"  # these tests rank by it
    widget._labels.value = viewer.layers["pred"]
    assert widget.refresh() == []
    assert "segment with flip TTA first" in errors[-1]
    widget._strategy.value = "random"
    assert len(widget.refresh()) == 3


def test_large_volumes_rank_in_a_worker_and_the_newest_request_wins(
    make_napari_viewer, qtbot, monkeypatch
):
    viewer, widget = _stack_viewer(make_napari_viewer)
    widget._gap.value = 0
    small = [u.index for u in widget.queue]  # ranked here: 8 x 32 x 32 is small
    assert small[:4] == [1, 3, 5, 7]
    monkeypatch.setattr(queue_module, "SCORE_IN_WORKER", 100)
    ran_on = []
    real = queue_module._Request.iter_rank

    def spy(self):
        import threading

        ran_on.append(threading.current_thread() is threading.main_thread())
        return (yield from real(self))

    monkeypatch.setattr(queue_module._Request, "iter_rank", spy)
    widget.queue = []
    assert widget.refresh() == []  # handed to a worker
    assert widget.ranking
    viewer.layers["pred"].metadata[REVIEWED_KEY] = {1, 3}
    widget.refresh()  # a newer request supersedes the first
    qtbot.waitUntil(lambda: not widget.ranking, timeout=10_000)
    assert ran_on
    assert not any(ran_on)  # never on the UI thread
    assert [u.index for u in widget.queue[:2]] == [5, 7]  # the newer request's answer
    qtbot.wait(200)  # the first request's late answer does not overwrite it
    assert [u.index for u in widget.queue[:2]] == [5, 7]
    assert widget.table.item(0, 0).text() == "slice 5"


def test_large_volume_errors_arrive_as_notifications(make_napari_viewer, qtbot, monkeypatch,
                                                     errors):  # fmt: skip
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="pred")
    viewer.add_image(np.full((3, 8, 8), 5.0, np.float32), name="raw")
    monkeypatch.setattr(queue_module, "SCORE_IN_WORKER", 10)
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Queue")
    widget._strategy.value = "uncertainty"  # these tests rank by it
    widget._labels.value = viewer.layers["pred"]
    widget._uncertainty.value = viewer.layers["raw"]
    qtbot.waitUntil(lambda: bool(errors) and not widget.ranking, timeout=10_000)
    assert "not an uncertainty map" in errors[-1]
    assert widget._status.value == "cannot rank"


def test_closing_stops_following_the_uncertainty_layer(make_napari_viewer):
    viewer, widget = _stack_viewer(make_napari_viewer)
    unc = viewer.layers["unc"]
    before = len(unc.events.data.callbacks)
    dock = next(d for d in viewer.window._wrapped_dock_widgets.values()
                if d.widget() is widget.native)  # fmt: skip
    viewer.window.remove_dock_widget(dock)
    assert len(unc.events.data.callbacks) == before - 1
    widget.queue = []
    unc.data = np.ones((8, 32, 32), np.float32)  # no re-ranking in a closed widget
    assert widget.queue == []
