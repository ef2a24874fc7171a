"""`napari-segtool demo`: napari with the plugin docked and a sample loaded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

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
    queue: bool = False,
    project: Path | None = None,
) -> int:
    """Open the demo and run napari's event loop until the window closes.

    With ``screenshot``, save a picture of the whole window (after segmenting when ``segment``
    is true) and close instead of waiting for the user. ``review`` (implies ``segment``) docks
    the Review widget on the prediction against the sample's reference and corrects part of
    the middle slice through paint edits before the picture. ``finetune`` (implies
    ``segment``; ignored with ``review``) docks the Fine-tune widget, corrects three slices
    completely, marks them reviewed and runs one fine-tuning round (project in ``project``,
    default a temporary folder) before the picture. ``queue`` (implies ``segment``, with flip
    TTA) docks the Queue ranking 128 x 128 patches and zooms to the top one; after the
    ``finetune`` round, that patch is marked reviewed in the Fine-tune widget.
    """
    if screenshot is not None:  # napari's own PyQt5 notice would cover part of the picture
        warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    viewer, widget = open_demo(sample)
    if screenshot is None and not (segment or review or finetune or queue):
        napari.run()
        return 0
    if queue:
        widget._tta.value = True  # the Queue ranks by the uncertainty layer it adds
    run = _ScriptedDemo(viewer, widget, screenshot=screenshot, review=review,
                        finetune=finetune, project=project)  # fmt: skip
    run.queue = queue
    QTimer.singleShot(500, run.begin)
    napari.run()
    return run.code


class _ScriptedDemo:
    """The demo's script: segment, then show Review or Fine-tune at work, then the picture."""

    def __init__(self, viewer: napari.Viewer, widget: SegmentWidget, *,
                 screenshot: Path | None, review: bool, finetune: bool,
                 project: Path | None):  # fmt: skip
        self.viewer, self.widget = viewer, widget
        self.screenshot, self.review, self.finetune = screenshot, review, finetune
        self.project = project
        self.queue = False
        self._finetune_panel: Any = None
        self.code = 0
        self._waited_ms = 0
        viewer.window.resize(1500, 1000 if (review or finetune) else 850)

    def fail(self) -> None:
        self.code = 1
        self.finish()

    def finish(self) -> None:
        if self.screenshot is not None:
            for toast in self.viewer.window._qt_window.findChildren(QWidget):
                if type(toast).__name__ == "NapariQtNotification":  # napari's own notices
                    toast.close()
            QApplication.processEvents()
            self.viewer.screenshot(str(self.screenshot), canvas_only=False, flash=False)
        self.viewer.close()

    def begin(self) -> None:
        worker = self.widget.start()
        if worker is None:
            self.fail()
            return
        worker.finished.connect(self.after_segment)

    def after_segment(self) -> None:
        if self.widget._status.value == "failed":
            self.fail()
            return
        if self.review or self.finetune or self.queue:
            self.widget.dock.hide()  # room for the widget being shown
        if self.review:
            self.start_review()  # takes the picture itself when the correction is shown
        elif self.finetune:
            self.start_finetune()
        elif self.queue:
            self.start_queue()
        else:
            QTimer.singleShot(300, self.finish)

    # -- Queue ----------------------------------------------------------------------------------
    def start_queue(self) -> None:
        """Dock the Queue on 128 x 128 patches and show the top one (marked reviewed after a
        Fine-tune round); the picture follows once it is ranked."""
        edited, _ = _prediction_and_reference(self.viewer)
        _, queue = self.viewer.window.add_plugin_dock_widget(PLUGIN, "Queue")
        queue._labels.value = edited
        queue._strategy.value = "uncertainty"  # disagreement needs a promoted round first
        queue._tile.value = 128
        queue._length.value = 8
        queue._units.value = "patches"
        self._when_ranked(queue, self._show_top)

    def _when_ranked(self, queue: Any, then: Any) -> None:
        if queue.ranking or not queue.queue:
            self._waited_ms += 200
            if self._waited_ms > 240_000:
                self.fail()
                return
            QTimer.singleShot(200, lambda: self._when_ranked(queue, then))
            return
        then(queue)

    def _show_top(self, queue: Any) -> None:
        queue.jump_to(0)
        if self._finetune_panel is None:
            queue.table.selectRow(0)
            QTimer.singleShot(800, self.finish)
            return
        self._finetune_panel.toggle_patch()  # reviewed: it leaves the queue
        queue.refresh()
        QTimer.singleShot(300, lambda: self._when_ranked(queue, self._after_review))

    def _after_review(self, queue: Any) -> None:
        queue.table.selectRow(0)
        QTimer.singleShot(800, self.finish)

    # -- Review ---------------------------------------------------------------------------------
    def start_review(self) -> None:
        edited, reference = _prediction_and_reference(self.viewer)
        _, panel = self.viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
        panel._edited.value = edited
        panel._reference.value = reference
        self._correct_when_counted(panel, edited, reference)

    def _correct_when_counted(
        self, panel: Any, edited: napari.layers.Labels, reference: napari.layers.Labels
    ) -> None:
        """Correct once the first count (in a worker for a large stack) is in."""
        if panel.tracker is None or panel._recounting:
            QTimer.singleShot(200, lambda: self._correct_when_counted(panel, edited, reference))
            return
        z = int(self.viewer.dims.current_step[0]) if edited.ndim == 3 else 0
        correct_like_a_user(edited, reference, z)
        edited.selected_label = 1
        panel.flush()
        QTimer.singleShot(1000, self.finish)  # the Dice plot redraws within PLOT_EVERY_MS

    # -- Fine-tune ------------------------------------------------------------------------------
    def start_finetune(self) -> None:
        import tempfile

        edited, reference = _prediction_and_reference(self.viewer)
        _, panel = self.viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
        panel._labels.value = edited
        panel._folder.value = self.project or Path(tempfile.mkdtemp()) / "demo.segtool"
        # a short round, so the demo finishes in about a minute on a 2-core CPU
        panel._epochs.value, panel._steps.value = DEMO_EPOCHS, DEMO_STEPS
        if not panel.open_project():
            self.fail()
            return
        dims = self.viewer.dims
        here = int(dims.current_step[0]) if edited.ndim == 3 else 0
        for z in (here, here - 4, here + 4) if edited.ndim == 3 else (0,):
            correct_like_a_user(edited, reference, z, box=max(edited.data.shape[-2:]))
            dims.set_current_step(0, z)
            panel.toggle_reviewed()
        dims.set_current_step(0, here)
        worker = panel.start()
        if worker is None:
            self.fail()
            return
        worker.finished.connect(lambda: QTimer.singleShot(500, lambda: self._settled(panel)))

    def _settled(self, panel: Any) -> None:
        """Wait for a promoted version's re-segmentation, then take the picture."""
        self._waited_ms += 500
        busy = "re-segmenting" in str(panel._status.value) and self._waited_ms <= 120_000
        if panel.worker is None and not busy:
            if self.queue:
                self._finetune_panel = panel
                self.start_queue()
            else:
                QTimer.singleShot(300, self.finish)
        else:
            QTimer.singleShot(500, lambda: self._settled(panel))
