"""What the Fine-tune widget shows: the versions table, the loss / validation-Dice plot of the
round in progress, and the project's learning curve (validation Dice of each round against the
voxels painted so far)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from napari_segtool.io.project import ProjectState
from napari_segtool.training import EpochReport

START = "start"  # the row of the model the project started from


class VersionsTable(QTableWidget):
    """One row per model version (and one for the starting model): Dice figures, in use."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.setHorizontalHeaderLabels(["version", "val Dice", "start Dice", "in use"])
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setStretchLastSection(True)
        self.setMinimumHeight(100)

    def show_state(self, state: ProjectState) -> None:
        """Fill the table from the project's versions."""
        rows = [{"version": START, "val_dice": None, "baseline_dice": None}, *state.versions]
        self.setRowCount(len(rows))
        for r, entry in enumerate(rows):
            v = entry["version"]
            in_use = (v == START and state.current_version is None) or v == state.current_version
            cells = [str(v), _num(entry.get("val_dice")), _num(entry.get("baseline_dice")),
                     "yes" if in_use else ""]  # fmt: skip
            for c, text in enumerate(cells):
                self.setItem(r, c, QTableWidgetItem(text))
        self.resizeColumnsToContents()

    def selected(self) -> tuple[bool, int | None]:
        """``(any selected, version)``; the version is None for the starting model's row."""
        rows = sorted({i.row() for i in self.selectedIndexes()})
        if not rows:
            return False, None
        text = self.item(rows[0], 0).text()
        return True, None if text == START else int(text)


class CurvePlot:
    """Train loss and validation Dice per epoch (persistent artists: cheap on the UI thread)."""

    def __init__(self) -> None:
        self.figure = Figure(figsize=(3, 1.8))
        self.figure.subplots_adjust(left=0.14, right=0.97, top=0.95, bottom=0.22)
        self.axes = self.figure.add_subplot()
        (self._loss,) = self.axes.plot([], [], "o-", label="train loss")
        (self._dice,) = self.axes.plot([], [], "s-", label="val Dice")
        self.axes.set_xlabel("epoch", fontsize=7)
        self.axes.tick_params(labelsize=7)
        self.axes.legend(fontsize=6, loc="center right")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(120)

    def show_reports(self, reports: Sequence[EpochReport]) -> None:
        """Redraw both curves from the epochs so far."""
        self._loss.set_data([r.epoch for r in reports], [r.train_loss for r in reports])
        dice = [(r.epoch, r.val_dice) for r in reports if r.val_dice is not None]
        self._dice.set_data([e for e, _ in dice], [d for _, d in dice])
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()


class LearningCurve:
    """The project's validation Dice per round against the voxels the user had painted.

    One point per version that records both (``val_dice``, ``painted_voxels``): filled when the
    version was promoted, hollow when it was kept but not used. Redrawn only when they change.
    """

    def __init__(self) -> None:
        self.figure = Figure(figsize=(3, 1.8))
        self.figure.subplots_adjust(left=0.17, right=0.97, top=0.97, bottom=0.27)
        self.axes = self.figure.add_subplot()
        (self._used,) = self.axes.plot([], [], "o-", color="C2", label="promoted")
        (self._kept,) = self.axes.plot([], [], "o", mfc="none", color="C3", label="not used")
        self.axes.set_xlabel("voxels painted so far (project rounds)", fontsize=7)
        self.axes.set_ylabel("val Dice", fontsize=7)
        self.axes.tick_params(labelsize=6)
        self.axes.legend(fontsize=6, loc="lower right")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(130)
        self.points: list[tuple[int, float, bool]] = []

    def show_state(self, state: ProjectState) -> None:
        """Plot the versions' figures (a no-op when they did not change)."""
        points = [
            (int(v["painted_voxels"]), float(v["val_dice"]), bool(v.get("promoted")))
            for v in state.versions
            if v.get("val_dice") is not None and v.get("painted_voxels") is not None
        ]
        if points == self.points:
            return
        self.points = points
        used = [(x, y) for x, y, p in points if p]
        kept = [(x, y) for x, y, p in points if not p]
        self._used.set_data([x for x, _ in used], [y for _, y in used])
        self._kept.set_data([x for x, _ in kept], [y for _, y in kept])
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
