"""The Review widget's Dice-against-editing-time line, redrawn at most every few hundred ms."""

from __future__ import annotations

import contextlib
import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer

PLOT_EVERY_MS = 400  # the Dice plot is redrawn at most this often (an Agg draw is ~20 ms)


class DicePlot:
    """One line artist on a small canvas; :meth:`add` is cheap, the redraw is throttled."""

    def __init__(self, *, every_ms: int = PLOT_EVERY_MS):
        self.figure = Figure(figsize=(3, 1.6))
        self.figure.subplots_adjust(left=0.2, right=0.97, top=0.95, bottom=0.28)
        self.axes = self.figure.add_subplot()
        (self.line,) = self.axes.plot([], [], marker=".", lw=1)
        self.axes.set_xlabel("editing time (s)", fontsize=7)
        self.axes.set_ylabel("Dice", fontsize=7)
        self.axes.tick_params(labelsize=6)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.history: list[tuple[float, float]] = []
        self._t0 = time.monotonic()
        self._timer = QTimer(self.canvas)
        self._timer.setSingleShot(True)
        self._timer.setInterval(every_ms)
        self._timer.timeout.connect(self.draw)

    def reset(self) -> None:
        """Start a new line (a new pair of layers): time counts from now."""
        self.history = []
        self._t0 = time.monotonic()

    def add(self, dice: float) -> None:
        """Append a point now; the canvas is redrawn within ``every_ms``."""
        self.history.append((time.monotonic() - self._t0, dice))
        if not self._timer.isActive():  # at most one redraw per interval
            self._timer.start()

    def draw(self) -> None:
        """Update the line (redrawn when Qt is idle)."""
        if self.history:
            t, d = zip(*self.history, strict=True)
            self.line.set_data(t, d)
        else:
            self.line.set_data([], [])
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the Qt side may be gone already
            self._timer.stop()
