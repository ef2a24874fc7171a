"""The Review dock widget: live Dice/IoU and the rest while the user corrects a mask."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import napari
import napari.layers
import numpy as np
from magicgui.widgets import Container, Label, ProgressBar, PushButton, create_widget
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QAbstractItemView, QTableWidget

from napari_segtool._widgets._closing import on_close
from napari_segtool._widgets._dice_plot import PLOT_EVERY_MS, DicePlot
from napari_segtool._widgets._layout import fixed_width, set_cell
from napari_segtool._widgets._review_count import BlockwiseCount, uncounted_trackers
from napari_segtool._widgets.roles import RoleDefault, apply_all, data_version
from napari_segtool._widgets.segment import ORIGINAL_KEY
from napari_segtool.errors import SegtoolError
from napari_segtool.io.paint import paint_changes
from napari_segtool.layer_roles import PREDICTION, REFERENCE
from napari_segtool.metrics import ConfusionTracker, evaluate
from napari_segtool.metrics.report import DISTANCE_KEYS, METRIC, SUMMARY_KEYS

logger = logging.getLogger(__name__)

# voxels above which counting leaves the UI thread (~10 ms); zarr and dask layers always do
RECOUNT_IN_WORKER = 2**20
TABLE_DELAY_MS = 20  # paint events update the tables this much later, after the canvas


class ReviewWidget(Container):
    """Compare an edited Labels layer with a reference, live while painting."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._edited = create_widget(annotation="napari.layers.Labels", label="edited")
        self._reference = create_widget(annotation="napari.layers.Labels", label="reference")
        self._status = Label(label="", value="")
        self._effort = Label(label="edit effort", value="-")
        self._distances = PushButton(text="Compute distances (HD, HD95, ASSD)")
        self._count_button = PushButton(text="Recount")
        self._count_button.tooltip = "Count the pair again from scratch (Cancel while counting)"
        # always shown: showing or hiding it would relayout the docks and redraw the canvas
        self._progress = ProgressBar(label="counted", value=0, min=0, max=100)
        self.extend([self._edited, self._reference, self._status, self._progress,
                     self._count_button, self._effort, self._distances])  # fmt: skip
        for label in (self._status, self._effort):
            fixed_width(label)  # a new text per paint must not relayout the docks
        self._build_tables()
        self._dice_plot = DicePlot(every_ms=PLOT_EVERY_MS)
        self._canvas = self._dice_plot.canvas
        # small minimums (the tables scroll): Review and Fine-tune docked on one side must
        # still fit a 1080-pixel screen
        for w, height in ((self.summary, 220), (self.slices, 100), (self._canvas, 110)):
            w.setMinimumHeight(height)
            self.native.layout().addWidget(w)
        self.tracker: ConfusionTracker | None = None
        self.effort_tracker: ConfusionTracker | None = None
        self._layers: tuple[napari.layers.Labels, napari.layers.Labels] | None = None
        self._versions: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._count = BlockwiseCount(  # a large or lazy pair's count, in a worker
            status=self._status, progress=self._progress, button=self._count_button,
            on_done=self._show_counts, on_error=self._on_error,
        )  # fmt: skip
        self._workers: list[Any] = []  # distance jobs
        self._closed = False
        self._build_timers()
        self._edited.changed.connect(self.attach)
        self._reference.changed.connect(self.attach)
        self._distances.changed.connect(self.compute_distances)
        self._count_button.changed.connect(self._on_count_clicked)
        self._viewer.dims.events.current_step.connect(self._refresh_slice_column)
        labels = napari.layers.Labels
        self._role_defaults = (
            RoleDefault(self._reference, labels, REFERENCE, avoid=(PREDICTION,)),
            RoleDefault(self._edited, labels, PREDICTION, avoid=(REFERENCE,)),
        )
        on_close(self.native, self._teardown)
        self.attach()

    def _build_tables(self) -> None:
        """The summary (rows: the metric table) and the per-slice Dice/IoU table."""
        self.summary = QTableWidget(len(SUMMARY_KEYS), 2)
        self.summary.setHorizontalHeaderLabels(["image", "slice"])
        self.summary.setVerticalHeaderLabels(list(SUMMARY_KEYS))
        self.summary.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.summary.horizontalHeader().setDefaultSectionSize(72)
        self.summary.setMinimumWidth(320)  # names and both columns, without a scroll bar
        self.slices = QTableWidget(0, 2)
        self.slices.setHorizontalHeaderLabels(["Dice", "IoU"])
        self.slices.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.slices.cellClicked.connect(self._jump_to_slice)

    def _build_timers(self) -> None:
        # the tables follow the paint events a frame later: repainting a dozen changed cells
        # in the same frame as the canvas would add to the time from a dab to its redraw
        self._pending: set[int] | None = set()  # slice rows to update (None: all)
        self._table_timer = QTimer(self.native)
        self._table_timer.setSingleShot(True)
        self._table_timer.setInterval(TABLE_DELAY_MS)
        self._table_timer.timeout.connect(self.flush)

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer pickers, then point them at the layers of the right role."""
        super().reset_choices(*args)
        apply_all(self._viewer, getattr(self, "_role_defaults", ()))

    # -- wiring ------------------------------------------------------------------------------
    def _detach(self) -> None:
        if self._layers is None:
            return
        edited, reference = self._layers
        edited.events.paint.disconnect(self._on_edited_paint)
        reference.events.paint.disconnect(self._on_reference_paint)
        edited.events.set_data.disconnect(self._on_set_data)
        reference.events.set_data.disconnect(self._on_set_data)
        self._layers = None
        self._versions = None
        self._count.stop()
        self.tracker = self.effort_tracker = None

    def attach(self, *_: Any) -> None:
        """Start tracking the chosen pair (called when either picker changes)."""
        self._detach()
        edited, reference = self._edited.value, self._reference.value
        if edited is None or reference is None:
            self._status.value = "pick an edited layer and a reference"
            return
        if edited is reference:
            self._status.value = "pick two different layers"
            return
        problem = self._mismatch(edited, reference)
        if problem:
            self._status.value = "cannot compare"
            show_error(f"Review: {problem}")
            return
        self._layers = (edited, reference)
        edited.events.paint.connect(self._on_edited_paint)
        reference.events.paint.connect(self._on_reference_paint)
        edited.events.set_data.connect(self._on_set_data)
        reference.events.set_data.connect(self._on_set_data)
        self._dice_plot.reset()
        self._status.value = f"{edited.name} vs {reference.name}"
        self.recount()

    def _baseline(self, edited: napari.layers.Labels) -> np.ndarray | None:
        """What the model wrote last (edit effort counts the user's changes from it)."""
        original = edited.metadata.get(ORIGINAL_KEY)
        if isinstance(original, np.ndarray) and original.shape == edited.data.shape:
            return original
        return None

    def recount(self) -> None:
        """Count again what may have changed: here for small in-memory pairs, else in a worker.

        A pair above :data:`RECOUNT_IN_WORKER` voxels, or held in zarr or dask arrays, is
        counted block by block in a worker (progress and Cancel in the dock), reading the
        live arrays. Paint events meanwhile update the slices already counted; a slice that
        an edit touched while it was being read is read again afterwards, so the counts end
        equal to a from-scratch count. After an undo or redo of such a pair, only the
        slices of the undone item are counted again.
        """
        if self._layers is None:
            return
        edited, reference = self._layers
        old_versions = self._versions
        self._versions = (data_version(edited), data_version(reference))
        pred, ref = _array(edited), _array(reference)
        baseline = self._baseline(edited)
        if not (_is_lazy(pred) or _is_lazy(ref) or pred.size > RECOUNT_IN_WORKER):
            self._count.stop()
            try:
                tracker = ConfusionTracker(pred, ref)
                effort = ConfusionTracker(pred, baseline) if baseline is not None else None
            except SegtoolError as exc:
                show_error(f"Review: {exc}")
                return
            self.tracker, self.effort_tracker = tracker, effort
            self._show_counts()
            return
        if self._count.recount_undone(old_versions, pred, ref, baseline):
            return
        try:
            tracker, effort = uncounted_trackers(pred, ref, baseline)
        except SegtoolError as exc:
            show_error(f"Review: {exc}")
            return
        self.tracker, self.effort_tracker = tracker, effort
        self._clear_tables()
        self._count.start(tracker, effort, self._layers)

    @property
    def _recounting(self) -> int:
        """Generation of the count in flight in a worker (0: none); for tests and scripting."""
        return self._count.recounting

    def _on_count_clicked(self, *_: Any) -> None:
        if self._count.busy:
            self.cancel_count()
        else:
            self._versions = None  # nothing to compare with: count everything
            self.recount()

    def cancel_count(self) -> None:
        """Stop counting after the current block; the numbers stay blank until a recount."""
        self._count.cancel()

    def _show_counts(self) -> None:
        """A complete count: the slice table's rows, the numbers, the pair's names."""
        if self._layers is None or self.tracker is None:
            return
        rows = self.tracker.n_slices if self.tracker.pred.ndim >= 3 else 0
        if self.slices.rowCount() != rows:
            self._build_slice_table()
        self._status.value = f"{self._layers[0].name} vs {self._layers[1].name}"
        self._progress.value = 100
        self.refresh()

    def _clear_tables(self) -> None:
        self._progress.value = 0
        for row in range(len(SUMMARY_KEYS)):
            for col in (0, 1):
                set_cell(self.summary, row, col, "")
        self.slices.setRowCount(0)
        self._effort.value = "-"

    @staticmethod
    def _mismatch(edited: napari.layers.Labels, reference: napari.layers.Labels) -> str:
        if edited.data.shape != reference.data.shape:
            return (f"'{edited.name}' has shape {edited.data.shape} but '{reference.name}' has "
                    f"{reference.data.shape}; pick layers of the same image")  # fmt: skip
        if not np.allclose(edited.scale, reference.scale):
            return (f"'{edited.name}' has scale {tuple(edited.scale)} but '{reference.name}' "
                    f"has {tuple(reference.scale)}; their voxels do not line up")  # fmt: skip
        return ""

    # -- events -----------------------------------------------------------------------------
    def _on_edited_paint(self, event: Any) -> None:
        self._on_paint(event.value, "pred")

    def _on_reference_paint(self, event: Any) -> None:
        self._on_paint(event.value, "ref")

    def _on_paint(self, atoms: Any, which: str) -> None:
        if self._layers is None:
            return
        self._count.note_edit(atoms)  # a block of these units read meanwhile is read again
        if self.tracker is not None:  # counted units follow the event; the rest are read later
            self.tracker.apply_atoms(atoms, which=which)  # type: ignore[arg-type]
            if self.effort_tracker is not None and which == "pred":
                self.effort_tracker.apply_atoms(atoms, which="pred")
        # a paint adds to the undo history: remember that state, so it is not a "change"
        self._versions = (data_version(self._layers[0]), data_version(self._layers[1]))
        if self.tracker is not None and self.tracker.complete:
            touched = _touched(atoms, self.tracker)
            self._pending = (
                None if touched is None or self._pending is None else (self._pending | touched)
            )
            if not self._table_timer.isActive():
                self._table_timer.start()

    def flush(self) -> None:
        """Show the counts of the paint events since the last update now (else a frame later)."""
        if self._table_timer.isActive():
            self._table_timer.stop()
        rows, self._pending = self._pending, set()
        self.refresh(rows)

    def _on_set_data(self, *_: Any) -> None:
        """Undo, redo or new data: no paint event, so count again; a slice change is not one.

        napari also sends ``set_data`` on every step of the Z slider; the layers' data
        versions (array identity, undo/redo history) tell the two apart.
        """
        if self._layers is None:
            return
        versions = (data_version(self._layers[0]), data_version(self._layers[1]))
        if versions == self._versions:
            return
        self.recount()

    def _on_error(self, exc: Exception) -> None:
        show_error(f"Review: {exc}")

    # -- display ----------------------------------------------------------------------------
    def _current_slice(self) -> int | None:
        if self.tracker is None or self.tracker.pred.ndim < 3:
            return None
        return int(self._viewer.dims.current_step[0])

    def refresh(self, touched: set[int] | None = None) -> None:
        """Redraw the tables from the tracker's counts (cheap: no pass over the voxels).

        Nothing is shown while a count is under way: the numbers would be of part of the pair.
        """
        if self.tracker is None or not self.tracker.complete:
            return
        whole = self.tracker.metrics()
        for row, key in enumerate(SUMMARY_KEYS):
            if key not in DISTANCE_KEYS:
                set_cell(self.summary, row, 0, METRIC[key].format(whole[key]))
        self._refresh_slice_column()
        rows = range(self.tracker.n_slices) if touched is None else sorted(touched)
        self._update_slice_rows(rows)
        if self.effort_tracker is not None:
            changed = int(self.effort_tracker.totals().sum() - np.trace(
                self.effort_tracker.totals()))  # fmt: skip
            share = changed / max(self.effort_tracker.pred.size, 1)
            self._effort.value = f"{changed} voxels changed ({100 * share:.2f} %)"
        self._dice_plot.add(float(whole["dice"]))

    def _refresh_slice_column(self, *_: Any) -> None:
        z = self._current_slice()
        if self.tracker is None or not self.tracker.complete:
            return
        m = self.tracker.metrics(z) if z is not None else self.tracker.metrics()
        for row, key in enumerate(SUMMARY_KEYS):
            if key not in DISTANCE_KEYS:
                set_cell(self.summary, row, 1, METRIC[key].format(m[key]))

    def _build_slice_table(self) -> None:
        n = self.tracker.n_slices if self.tracker is not None else 0
        rows = n if self.tracker is not None and self.tracker.pred.ndim >= 3 else 0
        self.slices.setRowCount(rows)
        self.slices.setVerticalHeaderLabels([f"z {z}" for z in range(rows)])

    def _update_slice_rows(self, rows: Any) -> None:
        if self.tracker is None or self.slices.rowCount() == 0:
            return
        for z in rows:
            m = self.tracker.metrics(z)
            set_cell(self.slices, z, 0, METRIC["dice"].format(m["dice"]))
            set_cell(self.slices, z, 1, METRIC["iou"].format(m["iou"]))

    def _jump_to_slice(self, row: int, _col: int = 0) -> None:
        self._viewer.dims.set_current_step(0, row)

    # -- distances ----------------------------------------------------------------------------
    def compute_distances(self, *_: Any) -> Any:
        """HD, HD95 and ASSD of the whole image and the current slice, in a worker."""
        if self._layers is None:
            show_error("Review: pick an edited layer and a reference first")
            return None
        edited, reference = self._layers
        pred, ref = _array(edited), _array(reference)
        spacing = tuple(edited.scale)
        z = self._current_slice()
        lazy = _is_lazy(pred) or _is_lazy(ref)
        if lazy and z is None:
            show_error("Review: surface distances need the whole image in memory; this one "
                       "is held on disk (zarr or dask)")  # fmt: skip
            return None
        if lazy:  # the current slice only: a volume on disk may not fit in memory
            pred, ref = np.asarray(pred[z]), np.asarray(ref[z])
        else:
            pred, ref = pred.copy(), ref.copy()

        def job() -> tuple[dict | None, dict | None]:
            if lazy:
                return None, evaluate(pred, ref, spacing=spacing[1:])
            whole = evaluate(pred, ref, spacing=spacing)
            if z is None:
                return whole, None
            return whole, evaluate(pred[z], ref[z], spacing=spacing[1:])

        self._distances.enabled = False
        self._status.value = "computing distances..."
        worker = create_worker(job, _connect={"returned": self._show_distances,
                                              "errored": self._on_error,
                                              "finished": self._distances_done})  # fmt: skip
        self._workers.append(worker)
        return worker

    def _show_distances(self, result: tuple[dict | None, dict | None]) -> None:
        whole, current = result
        for row, key in enumerate(SUMMARY_KEYS):
            if key in DISTANCE_KEYS:
                if whole is not None:
                    set_cell(self.summary, row, 0, METRIC[key].format(whole[key]))
                if current is not None:
                    set_cell(self.summary, row, 1, METRIC[key].format(current[key]))
        if self._layers is not None:
            self._status.value = f"{self._layers[0].name} vs {self._layers[1].name}"

    def _distances_done(self) -> None:
        self._distances.enabled = True

    def _teardown(self, *_: Any) -> None:
        """Closed: let go of the layers and the viewer, and stop the workers."""
        if self._closed:
            return
        self._closed = True
        self._count.close()
        self._detach()
        self._viewer.dims.events.current_step.disconnect(self._refresh_slice_column)
        self._dice_plot.stop()
        with contextlib.suppress(RuntimeError):  # the Qt side may be gone already
            self._table_timer.stop()
        for worker in self._workers:
            worker.quit()

    # -- for tests and scripting --------------------------------------------------------------
    def value(self, key: str, column: int = 0) -> str:
        """Text shown for metric ``key`` (column 0: whole image, 1: current slice)."""
        if self._table_timer.isActive():
            self.flush()
        item = self.summary.item(SUMMARY_KEYS.index(key), column)
        return item.text() if item is not None else ""


def _array(layer: napari.layers.Labels) -> Any:
    """The layer's full-resolution array (level 0 of a multiscale one), as it is: not loaded."""
    return layer.data[0] if layer.multiscale else layer.data


def _is_lazy(arr: Any) -> bool:
    """zarr, dask and other array-likes: read block by block, never as a whole."""
    return not isinstance(arr, np.ndarray)


def _touched(atoms: Any, tracker: ConfusionTracker) -> set[int] | None:
    """Slices along Z that a paint event changed (None: recompute every row)."""
    if tracker.pred.ndim < 3:
        return None
    zs: set[int] = set()
    for change in paint_changes(atoms):
        zs |= change.planes(tracker.n_slices)
    return zs
