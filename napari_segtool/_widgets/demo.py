"""`napari-segtool demo`: napari with the plugin docked and a sample loaded."""

from __future__ import annotations

import warnings
from pathlib import Path

import napari
import napari.layers
import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QWidget

from napari_segtool._widgets.segment import SegmentWidget

PLUGIN = "napari-segtool"
DEMO_EPOCHS, DEMO_STEPS = 2, 8  # the demo's fine-tuning round (the widget's default is 6 x 15)


def open_demo(sample: str = "isbi_em") -> tuple[napari.Viewer, SegmentWidget]:
    """A viewer with ``sample`` opened and the Segment widget docked (through the manifest)."""
    viewer = napari.Viewer(title="napari-segtool demo")
    viewer.open_sample(PLUGIN, sample)
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.dock = dock
    return viewer, widget


def correct_like_a_user(
    edited: napari.layers.Labels, reference: napari.layers.Labels, z: int, box: int = 160
) -> int:
    """Copy the reference into ``edited`` in a ``box`` square of slice ``z``, as paint edits.

    Goes through ``Labels.data_setitem`` (which sends the same paint events as the brush), one
    edit per label value, so a Review widget watching the layer updates as if a user painted.
    Returns the number of voxels changed.
    """
    pred, ref = edited.data, reference.data
    h, w = pred.shape[-2:]
    by, bx = min(box, h), min(box, w)  # a box larger than the slice is the whole slice
    y0, x0 = (h - by) // 2, (w - bx) // 2
    region = (z, slice(y0, y0 + by), slice(x0, x0 + bx))
    wrong = pred[region] != ref[region]
    ys, xs = np.nonzero(wrong)
    values = ref[region][wrong]
    for value in np.unique(values):
        pick = values == value
        indices = (np.full(int(pick.sum()), z), ys[pick] + y0, xs[pick] + x0)
        edited.data_setitem(indices, int(value))
    return int(wrong.sum())


def _prediction_and_reference(
    viewer: napari.Viewer,
) -> tuple[napari.layers.Labels, napari.layers.Labels]:
    labels = [layer for layer in viewer.layers if isinstance(layer, napari.layers.Labels)]
    reference = next(layer for layer in labels if layer.name.endswith("reference"))
    edited = next(layer for layer in labels if layer.name.endswith("prediction"))
    return edited, reference


def run_demo(
    sample: str = "isbi_em",
    *,
    screenshot: Path | None = None,
    segment: bool = False,
    review: bool = False,
    finetune: bool = False,
    project: Path | None = None,
) -> int:
    """Open the demo and run napari's event loop until the window closes.

    With ``screenshot``, save a picture of the whole window (after segmenting when ``segment``
    is true) and close instead of waiting for the user. ``review`` (implies ``segment``) docks
    the Review widget on the prediction against the sample's reference and corrects part of
    the middle slice through paint edits before the picture. ``finetune`` (implies
    ``segment``) docks the Fine-tune widget, corrects three slices completely, marks them
    reviewed and runs one fine-tuning round (project in ``project``, default a temporary
    folder) before the picture.
    """
    if screenshot is not None:  # napari's own PyQt5 notice would cover part of the picture
        warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    viewer, widget = open_demo(sample)
    status = {"code": 0}
    segment = segment or review or finetune
    if screenshot is None and not segment:
        napari.run()
        return 0
    viewer.window.resize(1500, 1000 if (review or finetune) else 850)

    def finish() -> None:
        if screenshot is not None:
            for toast in viewer.window._qt_window.findChildren(QWidget):
                if type(toast).__name__ == "NapariQtNotification":  # napari's own notices
                    toast.close()
            QApplication.processEvents()
            viewer.screenshot(str(screenshot), canvas_only=False, flash=False)
        viewer.close()

    def after_run() -> None:
        if widget._status.value == "failed":
            status["code"] = 1
        if status["code"] == 0 and (review or finetune):
            widget.dock.hide()  # room for the widget being shown
        if status["code"] == 0 and review:
            start_review()  # takes the picture itself when the correction is shown
        elif finetune and status["code"] == 0:
            start_finetune()
        else:
            QTimer.singleShot(300, finish)

    def start_finetune() -> None:
        import tempfile

        edited, reference = _prediction_and_reference(viewer)
        _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
        panel._labels.value = edited
        folder = project or Path(tempfile.mkdtemp()) / "demo.segtool"
        panel._folder.value = folder
        # a short round, so the demo finishes in about a minute on a 2-core CPU
        panel._epochs.value, panel._steps.value = DEMO_EPOCHS, DEMO_STEPS
        if not panel.open_project():
            status["code"] = 1
            finish()
            return
        here = int(viewer.dims.current_step[0]) if edited.ndim == 3 else 0
        for z in (here, here - 4, here + 4) if edited.ndim == 3 else (0,):
            correct_like_a_user(edited, reference, z, box=max(edited.data.shape[-2:]))
            viewer.dims.set_current_step(0, z)
            panel.toggle_reviewed()
        viewer.dims.set_current_step(0, here)
        worker = panel.start()
        if worker is None:
            status["code"] = 1
            finish()
            return
        waited = {"ms": 0}

        def when_settled() -> None:  # a promoted version re-segments after training
            text = str(panel._status.value)
            waited["ms"] += 500
            if panel.worker is None and ("re-segmenting" not in text or waited["ms"] > 120_000):
                QTimer.singleShot(300, finish)
            else:
                QTimer.singleShot(500, when_settled)

        worker.finished.connect(lambda: QTimer.singleShot(500, when_settled))

    def start_review() -> None:
        edited, reference = _prediction_and_reference(viewer)
        _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
        panel._edited.value = edited
        panel._reference.value = reference

        def correct() -> None:  # once the first count (in a worker for a large stack) is in
            if panel.tracker is None or panel._recounting:
                QTimer.singleShot(200, correct)
                return
            z = int(viewer.dims.current_step[0]) if edited.ndim == 3 else 0
            correct_like_a_user(edited, reference, z)
            edited.selected_label = 1
            panel.flush()
            QTimer.singleShot(1000, finish)  # the Dice plot redraws within PLOT_EVERY_MS

        correct()

    def begin() -> None:
        if segment:
            worker = widget.start()
            if worker is None:
                status["code"] = 1
                finish()
                return
            worker.finished.connect(after_run)
        else:
            QTimer.singleShot(300, finish)

    QTimer.singleShot(500, begin)
    napari.run()
    return status["code"]
