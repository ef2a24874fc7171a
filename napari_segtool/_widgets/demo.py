"""`napari-segtool demo`: napari with the plugin docked and a sample loaded."""

from __future__ import annotations

from pathlib import Path

import napari
from qtpy.QtCore import QTimer

from napari_segtool._widgets.segment import SegmentWidget

PLUGIN = "napari-segtool"


def open_demo(sample: str = "isbi_em") -> tuple[napari.Viewer, SegmentWidget]:
    """A viewer with ``sample`` opened and the Segment widget docked (through the manifest)."""
    viewer = napari.Viewer(title="napari-segtool demo")
    viewer.open_sample(PLUGIN, sample)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    return viewer, widget


def run_demo(
    sample: str = "isbi_em", *, screenshot: Path | None = None, segment: bool = False
) -> int:
    """Open the demo and run napari's event loop until the window closes.

    With ``screenshot``, save a picture of the whole window (after segmenting when ``segment``
    is true) and close instead of waiting for the user.
    """
    viewer, widget = open_demo(sample)
    status = {"code": 0}
    if screenshot is None and not segment:
        napari.run()
        return 0
    viewer.window.resize(1400, 850)

    def finish() -> None:
        if screenshot is not None:
            viewer.screenshot(str(screenshot), canvas_only=False, flash=False)
        viewer.close()

    def after_run() -> None:
        if widget._status.value == "failed":
            status["code"] = 1
        QTimer.singleShot(300, finish)

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
