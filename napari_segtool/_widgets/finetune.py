"""The Fine-tune dock widget: train on the user's corrections in the background.

The widget keeps a project (corrections, reviewed slices, model versions) for one labels
layer, saves it after every round and on a timer, and restores it when the same image is
opened again. Only what the user changed or marked reviewed trains the model, and
re-segmenting writes only the voxels the user has not touched.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import napari.layers
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QTableWidget,
    QTableWidgetItem,
)

from napari_segtool._widgets import _gc
from napari_segtool._widgets._layout import fixed_width
from napari_segtool._widgets.queue import REVIEWED_KEY
from napari_segtool._widgets.roles import RoleDefault, apply_all, bump_version, role
from napari_segtool._widgets.segment import ORIGINAL_KEY, SOURCE_KEY, write_uncertainty_layer
from napari_segtool.active_learning import voxel_uncertainty
from napari_segtool.config import DEVICES, FinetuneConfig, InferenceConfig
from napari_segtool.errors import InputError, SegtoolError
from napari_segtool.inference import segment
from napari_segtool.io.project import Project, ProjectState, default_project_dir, merge_untouched
from napari_segtool.layer_roles import IMAGE, PREDICTION, REFERENCE, UNCERTAINTY
from napari_segtool.model import list_models
from napari_segtool.training import (
    EpochReport,
    FinetuneResult,
    LabelledImage,
    StepProgress,
    iter_finetune,
)
from napari_segtool.training.classes import ClassFit, fit_classes
from napari_segtool.training.versions import (
    current_model,
    record_round,
    switch_version,
    training_data,
)

logger = logging.getLogger(__name__)

AUTOSAVE_MS = 60_000
REVIEW_KEY = "Shift-R"
FROM_PREDICTION = "model that made the prediction"
UNTRAINED = tuple(e.name for e in list_models() if e.path is None)  # "new-2d", "new-3d"
PROGRAM = "napari-segtool Fine-tune (napari)"  # named when another writer is refused


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a round needs, copied on the main thread."""

    image: np.ndarray
    state: ProjectState  # a snapshot: the user keeps painting while it trains
    project: Project
    config: FinetuneConfig
    truth: np.ndarray | None = None
    extend: bool = True  # classes the model lacks grow its head instead of failing
    references: tuple[np.ndarray, ...] = ()  # their classes seed a new model's classes


def _train(job: FinetuneJob):
    """Worker body: fine-tune, then save the round as a version (never touches widgets)."""
    model = current_model(job.project, job.state)
    data = [training_data(job.image, job.state)]
    if job.truth is not None:
        data.append(LabelledImage(job.image, job.truth, None))
        if not data[0].mask.any():
            data = data[1:]
    untrained = job.state.current_version is None and job.state.base_model in UNTRAINED
    fit = fit_classes(model, data, untrained=untrained, extend=job.extend,
                      also=job.references)  # fmt: skip
    result = yield from iter_finetune(fit.model, data, config=job.config)
    # the state is the snapshot from the round's start: record only the version on disk, the
    # widget then saves its live state (corrections made meanwhile included)
    entry = record_round(job.project, job.state, result, save=False)
    return result, entry, job.state, fit


def _resegment(project: Project, state: ProjectState, image: np.ndarray, device: str):
    """Segment with the model in use, with flip TTA so the Queue gets a fresh uncertainty."""
    model = current_model(project, state)
    result = segment(image, model, config=InferenceConfig(device=device, tta=True))
    return result.labels, voxel_uncertainty(result)


class FinetuneWidget(Container):
    """Fine-tune on corrections, keep model versions, re-segment what was not touched."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        defaults = FinetuneConfig()
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._labels = create_widget(annotation="napari.layers.Labels", label="corrected")
        self._truth = create_widget(
            annotation="napari.layers.Labels", label="ground truth", options={"nullable": True}
        )
        self._truth.value = None
        self._truth.tooltip = (
            "Optional: a fully labelled layer of the same image; all its voxels train too"
        )
        self._model = ComboBox(
            label="start from",
            choices=[FROM_PREDICTION, *(e.name for e in list_models())],
            value=FROM_PREDICTION,
        )
        self._folder = FileEdit(label="project folder", mode="d")
        self._open = PushButton(text="Open / start project")
        self._reviewed = Label(label="reviewed", value="-")
        self._mark = PushButton(text=f"Mark slice reviewed ({REVIEW_KEY})")
        self._epochs = SpinBox(label="epochs", value=defaults.epochs, min=1, max=500)
        self._steps = SpinBox(
            label="steps / epoch", value=defaults.steps_per_epoch, min=1, max=10_000
        )
        self._lr = FloatSpinBox(
            label="learning rate", value=defaults.learning_rate, min=1e-6, max=1.0, step=1e-4
        )
        self._lr.native.setDecimals(5)
        self._device = ComboBox(label="device", choices=DEVICES, value=defaults.device)
        self._extend = CheckBox(label="add new classes", value=True)
        self._extend.tooltip = (
            "A correction with a class the model does not know (a new organ, say) adds that "
            "class to the model instead of stopping the round"
        )
        self._run = PushButton(text="Fine-tune")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self._use = PushButton(text="Use selected version")
        self._reseg = PushButton(text="Re-segment untouched")
        self._status = Label(label="", value="")
        for label in (self._status, self._reviewed):
            fixed_width(label)
        self.extend([
            self._image, self._labels, self._truth, self._model, self._folder, self._open,
            self._reviewed, self._mark, self._epochs, self._steps, self._lr, self._device,
            self._extend, self._run,
            self._progress, self._use, self._reseg, self._status,
        ])  # fmt: skip
        self._figure = Figure(figsize=(3, 1.8))
        self._figure.subplots_adjust(left=0.14, right=0.97, top=0.95, bottom=0.22)
        self._axes = self._figure.add_subplot()
        (self._loss_line,) = self._axes.plot([], [], "o-", label="train loss")
        (self._dice_line,) = self._axes.plot([], [], "s-", label="val Dice")
        self._axes.set_xlabel("epoch", fontsize=7)
        self._axes.tick_params(labelsize=7)
        self._axes.legend(fontsize=6, loc="center right")
        self._canvas = FigureCanvasQTAgg(self._figure)
        self.versions = QTableWidget(0, 4)
        self.versions.setHorizontalHeaderLabels(["version", "val Dice", "start Dice", "in use"])
        self.versions.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.versions.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.versions.verticalHeader().setVisible(False)
        self.versions.horizontalHeader().setStretchLastSection(True)
        self._canvas.setMinimumHeight(120)
        self.versions.setMinimumHeight(100)
        for w in (self._canvas, self.versions):
            self.native.layout().addWidget(w)

        self.project: Project | None = None
        self.state: ProjectState | None = None
        self._layer: napari.layers.Labels | None = None
        self._worker: Any = None
        self._side_workers: list[Any] = []
        self._curve: list[EpochReport] = []
        self._dirty = False
        self._closed = False
        self._open.changed.connect(self.open_project)
        self._mark.changed.connect(self.toggle_reviewed)
        self._run.changed.connect(self._on_run_clicked)
        self._use.changed.connect(self._use_selected)
        self._reseg.changed.connect(self.resegment)
        self._image.changed.connect(self._suggest_folder)
        self._labels.changed.connect(self._on_pick)
        self._suggest_folder()
        self._viewer.bind_key(REVIEW_KEY, self._key_reviewed, overwrite=True)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._timer = QTimer(self.native)  # parented: deleted with the widget, never after
        self._timer.setInterval(AUTOSAVE_MS)
        self._timer.timeout.connect(self.autosave)
        self._timer.start()
        self.native.destroyed.connect(self._teardown)
        # a script or session that ends without closing the widget still saves the last edits
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._final_save)
        atexit.register(_save_at_exit, weakref.ref(self))
        labels = napari.layers.Labels
        self._role_defaults = (
            RoleDefault(self._image, napari.layers.Image, IMAGE, avoid=(UNCERTAINTY,)),
            RoleDefault(self._labels, labels, PREDICTION, avoid=(REFERENCE,)),
        )

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer pickers, then point them at the layers of the right role."""
        super().reset_choices(*args)
        apply_all(self._viewer, getattr(self, "_role_defaults", ()))

    # -- project ------------------------------------------------------------------------------
    def _suggest_folder(self, *_: Any) -> None:
        layer = self._image.value
        path = getattr(getattr(layer, "source", None), "path", None)
        if path:
            self._folder.value = default_project_dir(path)
        elif layer is not None:
            self._folder.value = Path.home() / "segtool-projects" / f"{layer.name}.segtool"

    def _on_pick(self, *_: Any) -> None:
        """Picking a layer only says what Open would do; it never writes into a layer.

        (Restoring on a picker change once wrote a project's corrections into the reference
        layer when the prediction was closed and the picker moved by itself.)
        """
        layer = self._labels.value
        if layer is None or layer is self._layer:
            return
        folder = str(self._folder.value)
        attached = f" (the open project stays on '{self._layer.name}')" if self._layer else ""
        if folder not in ("", ".") and Project(folder).exists():
            self._status.value = f"saved project found: Open restores it{attached}"
        elif attached:
            self._status.value = f"Open starts a project on '{layer.name}'{attached}"

    def open_project(self, *_: Any) -> bool:
        """Attach to the chosen labels layer: restore its project or start one."""
        layer, image = self._labels.value, self._image.value
        project: Project | None = None
        try:
            if layer is None or image is None:
                raise InputError("pick the image and the corrected labels layer first")
            if role(layer) == REFERENCE:
                raise InputError(
                    f"'{layer.name}' is a reference layer, which Fine-tune never writes into; "
                    "pick the prediction to correct (a reference can train as 'ground truth')"
                )
            spatial = image.data.shape[:-1] if image.rgb else image.data.shape
            if tuple(layer.data.shape) != tuple(spatial):
                raise InputError(
                    f"'{layer.name}' has shape {layer.data.shape} but '{image.name}' has "
                    f"{tuple(spatial)}; pick the prediction of this image"
                )
            folder = Path(str(self._folder.value))
            if not str(self._folder.value) or str(self._folder.value) == ".":
                raise InputError("choose a project folder")
            same = self.project is not None and _same_folder(self.project.folder, folder)
            project = self.project if same else Project(folder, program=PROGRAM)
            assert project is not None
            project.lock()  # one writer per project: another window or a CLI round is refused
            if project.exists():
                state = project.load()
                if state.labels.shape != layer.data.shape:
                    raise InputError(
                        f"{project.state_path}: saved for shape {state.labels.shape}, not "
                        f"{layer.data.shape}; choose another project folder"
                    )
                if not np.array_equal(np.asarray(layer.data), state.labels):
                    # never lose what is in the layer now: keep it beside the restored one
                    backup = self._viewer.add_labels(
                        np.array(layer.data, copy=True), name=f"{layer.name} before restore",
                        scale=layer.scale, translate=layer.translate, visible=False,
                    )  # fmt: skip
                    show_info(f"Fine-tune: the layer's previous content is in '{backup.name}'")
                layer.data = state.labels  # restore the saved corrections
                state.labels = layer.data
                msg = f"restored {len(state.versions)} versions, {len(state.reviewed)} reviewed"
            else:
                state = self._new_state(layer, image)
                project.save(state)
                msg = "new project"
        except SegtoolError as exc:
            if project is not None and project is not self.project:
                project.unlock()
            show_error(f"Fine-tune: {exc}")
            return False
        self._detach()
        if self.project is not None and self.project is not project:
            self.project.unlock()
        self.project, self.state, self._layer = project, state, layer
        layer.events.paint.connect(self._on_paint)
        self._status.value = f"{msg} in {project.folder.name}"
        self._refresh()
        return True

    def _new_state(self, layer: napari.layers.Labels, image: napari.layers.Image) -> ProjectState:
        original = layer.metadata.get(ORIGINAL_KEY)
        data = np.asarray(layer.data)
        machine = original if isinstance(original, np.ndarray) else data
        base = self._model.value
        if base == FROM_PREDICTION:
            base = layer.metadata.get(SOURCE_KEY) or list_models()[0].name
        return ProjectState(
            labels=data,
            machine=np.array(machine, copy=True),
            painted=np.zeros(data.shape, bool),
            base_model=str(base),
            image={"name": image.name, "shape": list(data.shape),
                   "path": str(getattr(image.source, "path", "") or "")},
        )  # fmt: skip

    def _detach(self) -> None:
        if self._layer is not None:
            self._layer.events.paint.disconnect(self._on_paint)
        self._layer = None

    def _on_layer_removed(self, event: Any) -> None:
        """The corrected layer was closed: save what it held and let go of it."""
        if self._layer is None or event.value is not self._layer:
            return
        name = self._layer.name
        try:
            self.save_now()
        except (OSError, SegtoolError) as exc:
            show_error(f"Fine-tune: could not save the project of '{name}': {exc}")
        self.cancel()
        self._detach()
        if self.project is not None:
            self.project.unlock()
        self.project = self.state = None
        self._status.value = f"'{name}' closed; its project is saved"

    def _on_paint(self, event: Any) -> None:
        if self.state is not None:
            self.state.mark_painted(event.value)
            self._dirty = True

    def toggle_reviewed(self, *_: Any) -> None:
        """Mark the current slice reviewed (or unmark it)."""
        if self.state is None and not self.open_project():
            return
        assert self.state is not None
        z = int(self._viewer.dims.current_step[0]) if self.state.labels.ndim == 3 else 0
        if z in self.state.reviewed:
            self.state.reviewed.discard(z)
        else:
            self.state.reviewed.add(z)
        self._dirty = True
        self._refresh()

    def _key_reviewed(self, _viewer: Any) -> None:
        self.toggle_reviewed()

    def autosave(self) -> None:
        """Save in a worker when something changed (called by the timer)."""
        if self.project is None or self.state is None or not self._dirty:
            return
        self._dirty = False
        snapshot = self.state.snapshot()
        worker = create_worker(self.project.save, snapshot,
                               _connect={"errored": self._on_save_error})  # fmt: skip
        self._side_workers.append(worker)

    def save_now(self) -> None:
        """Save on this thread (used when closing)."""
        if self.project is not None and self.state is not None:
            self.project.save(self.state.snapshot())
            self._dirty = False

    def _on_save_error(self, exc: Exception) -> None:
        self._dirty = True
        show_error(f"Fine-tune: could not save the project: {exc}")

    # -- training -----------------------------------------------------------------------------
    @property
    def worker(self) -> Any:
        return self._worker

    def _collect_config(self) -> FinetuneJob:
        if self.state is None and not self.open_project():
            raise InputError("no project")
        assert self.state is not None
        assert self.project is not None
        image = self._image.value
        data = np.asarray(image.data[0] if image.multiscale else image.data)
        config = FinetuneConfig(
            epochs=int(self._epochs.value),
            steps_per_epoch=int(self._steps.value),
            learning_rate=float(self._lr.value),
            device=str(self._device.value),
        )
        truth = self._truth.value
        truth_data = None
        if truth is not None:
            if truth is self._layer:
                raise InputError("the ground truth must be another layer than the corrected one")
            if truth.data.shape != self.state.labels.shape:
                raise InputError(
                    f"ground truth '{truth.name}' has shape {truth.data.shape}, the "
                    f"corrections {self.state.labels.shape}"
                )
            truth_data = np.array(truth.data, copy=True)
        shape = self.state.labels.shape
        references = tuple(
            np.array(layer.data, copy=True)
            for layer in self._viewer.layers
            if isinstance(layer, napari.layers.Labels)
            and role(layer) == REFERENCE
            and tuple(layer.data.shape) == shape
        )
        return FinetuneJob(data, self.state.snapshot(), self.project, config, truth_data,
                           extend=bool(self._extend.value), references=references)  # fmt: skip

    def _on_run_clicked(self, *_: Any) -> None:
        if self._worker is not None:
            self.cancel()
        else:
            self.start()

    def start(self) -> Any:
        """Start a fine-tuning round in a worker thread; errors become notifications."""
        if self._worker is not None:
            return self._worker
        try:
            job = self._collect_config()
        except SegtoolError as exc:
            show_error(f"Fine-tune: {exc}")
            return None
        self._curve = []
        self._plot()
        self._worker = create_worker(
            _train,
            job,
            _connect={"yielded": self._on_yielded, "returned": self._on_trained,
                      "errored": self._on_error, "finished": self._on_finished},
            _start_thread=False,
        )  # fmt: skip
        self._run.text = "Cancel"
        self._progress.value = 0
        self._status.value = "fine-tuning..."
        _gc.hold()  # no full collection of napari's objects mid-round
        self._worker.start()
        return self._worker

    def cancel(self, *_: Any) -> None:
        """Stop after the current step; the model in use and its file stay as they were."""
        if self._worker is not None:
            self._status.value = "cancelling..."
            self._worker.quit()

    def _on_yielded(self, item: Any) -> None:
        if self._closed:
            return
        if isinstance(item, StepProgress):
            self._progress.value = round(100 * item.step / max(item.total_steps, 1))
            self._status.value = f"step {item.step} / {item.total_steps}, loss {item.loss:.3f}"
        elif isinstance(item, EpochReport):
            self._curve.append(item)
            self._plot()

    def _on_trained(self, out: tuple[FinetuneResult, dict, ProjectState, ClassFit]) -> None:
        if self._closed:
            return
        result, entry, saved, fit = out
        if fit.describe():
            show_info(f"Fine-tune: {fit.describe()}")
        self._progress.value = 100
        if self.state is None:  # the layer was closed meanwhile; the version is on disk
            return
        self.state.versions = saved.versions
        self.state.current_version = saved.current_version
        self._dirty = True
        self.autosave()  # the live state (edits made during the round) with the new version
        self._refresh()
        if entry["promoted"]:
            self._status.value = f"version {entry['version']} in use: re-segmenting..."
            self.resegment()
        elif entry.get("val_dice") is None or entry.get("baseline_dice") is None:
            why = getattr(result, "note", "") or "it had no held-out corrections to be judged on"
            show_warning(
                f"Fine-tune: version {entry['version']} kept, not used: {why}; correct or "
                "review more slices, or select the version and click 'Use selected version' "
                "to switch anyway"
            )
        else:
            show_warning(
                f"Fine-tune: version {entry['version']} scored {entry['val_dice']:.3f} on "
                f"held-out corrections, below {entry['baseline_dice']:.3f}; kept the model in "
                "use (select the version and click 'Use selected version' to switch anyway)"
            )
            self._status.value = f"version {entry['version']} kept, not used"
        logger.info("fine-tune round: %s", result.summary())

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        if isinstance(exc, SegtoolError):
            show_error(f"Fine-tune: {exc}")
        else:
            logger.error("fine-tuning failed", exc_info=exc)
            show_error(f"Fine-tune failed: {type(exc).__name__}: {exc}")
        self._status.value = "failed"

    def _on_finished(self) -> None:
        _gc.release()
        if self._closed:
            return
        if self._worker is not None and self._worker.abort_requested:
            self._status.value = "cancelled: the model in use is unchanged"
        self._worker = None
        self._run.text = "Fine-tune"

    # -- versions and re-segmenting -----------------------------------------------------------
    def _use_selected(self, *_: Any) -> None:
        if self.project is None or self.state is None:
            return
        rows = sorted({i.row() for i in self.versions.selectedIndexes()})
        if not rows:
            show_info("Fine-tune: select a version in the table first")
            return
        item = self.versions.item(rows[0], 0)
        version = None if item.text() == "start" else int(item.text())
        try:
            switch_version(self.project, self.state, version)
        except SegtoolError as exc:
            show_error(f"Fine-tune: {exc}")
            return
        self._refresh()

    def resegment(self, *_: Any) -> Any:
        """Segment again with the model in use; only untouched voxels take the result."""
        if self.project is None or self.state is None:
            show_error("Fine-tune: open a project first")
            return None
        image = self._image.value
        data = np.asarray(image.data[0] if image.multiscale else image.data)
        worker = create_worker(
            _resegment, self.project, self.state.snapshot(), data, str(self._device.value),
            _connect={"returned": self._merge, "errored": self._on_error},
        )  # fmt: skip
        self._side_workers.append(worker)
        return worker

    def _merge(self, out: tuple[np.ndarray, np.ndarray]) -> None:
        if self._closed:
            return
        if self.state is None or self._layer is None:
            return
        prediction, uncertainty = out
        self._write_uncertainty(uncertainty)
        changed = merge_untouched(self.state, prediction)  # protects what was painted since
        # the model's new output is the baseline of the edit effort: effort stays what the
        # user changed, not what re-segmenting changed
        machine = self.state.machine.copy()
        machine.setflags(write=False)
        self._layer.metadata[ORIGINAL_KEY] = machine
        bump_version(self._layer)  # rewritten in place: the Review widget must recount
        self._layer.data = self.state.labels
        self._dirty = True
        self.autosave()
        self._status.value = f"re-segmented: {changed} untouched voxels changed"

    def _write_uncertainty(self, data: np.ndarray) -> None:
        image = self._image.value
        if image is None:
            return
        write_uncertainty_layer(self._viewer, f"{image.name} uncertainty", data,
                                tuple(image.scale[-data.ndim :]),
                                tuple(image.translate[-data.ndim :]))  # fmt: skip

    # -- display ------------------------------------------------------------------------------
    def _refresh(self) -> None:
        state = self.state
        if state is None:
            return
        if self._layer is not None:  # the Queue widget leaves reviewed slices out
            self._layer.metadata[REVIEWED_KEY] = set(state.reviewed)
        reviewed = sorted(state.reviewed)
        shown = ", ".join(map(str, reviewed[:12])) + (" ..." if len(reviewed) > 12 else "")
        self._reviewed.value = f"{len(reviewed)} slices: {shown}" if reviewed else "none"
        rows = [{"version": "start", "val_dice": None, "baseline_dice": None}, *state.versions]
        self.versions.setRowCount(len(rows))
        for r, entry in enumerate(rows):
            v = entry["version"]
            in_use = (v == "start" and state.current_version is None) or v == (
                state.current_version
            )
            cells = [str(v), _num(entry.get("val_dice")), _num(entry.get("baseline_dice")),
                     "yes" if in_use else ""]  # fmt: skip
            for c, text in enumerate(cells):
                self.versions.setItem(r, c, QTableWidgetItem(text))
        self.versions.resizeColumnsToContents()

    def _plot(self) -> None:
        """Update the two curves (persistent artists: cheap enough for the UI thread)."""
        epochs = [r.epoch for r in self._curve]
        self._loss_line.set_data(epochs, [r.train_loss for r in self._curve])
        dice = [(r.epoch, r.val_dice) for r in self._curve if r.val_dice is not None]
        self._dice_line.set_data([e for e, _ in dice], [d for _, d in dice])
        self._axes.relim()
        self._axes.autoscale_view()
        self._canvas.draw_idle()

    def _teardown(self, *_: Any) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the Qt side may be gone already
            self._timer.stop()
        self.cancel()
        for worker in self._side_workers:
            worker.quit()
        self._final_save()
        if self.project is not None:
            self.project.unlock()

    def _final_save(self) -> None:
        """Save on close, on quit and at interpreter exit; never raises."""
        try:
            if self._dirty:
                self.save_now()
        except (OSError, SegtoolError) as exc:  # closing must not raise
            logger.error("could not save the project on close: %s", exc)


def _same_folder(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _save_at_exit(ref: weakref.ref) -> None:
    widget = ref()
    if widget is not None:
        widget._final_save()


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
