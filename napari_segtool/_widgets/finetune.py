"""The Fine-tune dock widget: train on the user's corrections in the background.

The widget keeps a project (corrections, reviewed slices, model versions) for one labels
layer, saves it after every round and on a timer, and restores it when the same image is
opened again. The round itself is the core's (:mod:`napari_segtool.workflows.correction`):
the widget gathers its inputs on the main thread, trains and records the version in a
worker, re-segments in another, and merges the new prediction into the layer on the main
thread, only where the user has not touched it.

A chunked project (its layer shows the project's zarr ``labels``) keeps the image lazy and
copies nothing of the volume: the round reads boxes in its worker, and re-segmenting merges
box by box into the store in a worker while painting on the layer is switched off (a merge
and a dab rewriting the same chunk would race), then saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import napari.layers
import numpy as np
import zarr
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FloatSpinBox,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning

from napari_segtool._widgets import _gc
from napari_segtool._widgets._layout import fixed_width
from napari_segtool._widgets.finetune_display import CurvePlot, LearningCurve, VersionsTable
from napari_segtool._widgets.finetune_project import check_pair, new_state, project_folder, restore
from napari_segtool._widgets.finetune_session import ProjectSession
from napari_segtool._widgets.queue import PREVIOUS_KEY
from napari_segtool._widgets.roles import RoleDefault, apply_all, bump_version, role
from napari_segtool._widgets.segment import ORIGINAL_KEY, write_uncertainty_layer
from napari_segtool.config import DEVICES, PRECISIONS, FinetuneConfig
from napari_segtool.errors import InputError, SegtoolError
from napari_segtool.io.project import ChunkedState, Project, ProjectState
from napari_segtool.layer_roles import IMAGE, PREDICTION, REFERENCE, UNCERTAINTY
from napari_segtool.model import list_models
from napari_segtool.training import EpochReport, StepProgress
from napari_segtool.training.versions import switch_version
from napari_segtool.workflows import (
    Resegmentation,
    RoundResult,
    iter_correction_round,
    iter_resegment,
    merge_resegmentation,
)
from napari_segtool.workflows.correction import iter_resegment_boxes, resegment_config
from napari_segtool.workflows.lazy_segment import UNCERTAINTY_STORE

logger = logging.getLogger(__name__)

FROM_PREDICTION = "model that made the prediction"
PROGRAM = "napari-segtool Fine-tune (napari)"  # named when another writer is refused


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a round needs, copied on the main thread."""

    image: Any  # numpy; lazy (zarr, dask) for a chunked project
    state: ProjectState | ChunkedState  # a snapshot: the user keeps painting while it trains
    project: Project
    config: FinetuneConfig
    truth: np.ndarray | None = None
    extend: bool = True  # classes the model lacks grow its head instead of failing
    references: tuple[np.ndarray, ...] = ()  # their classes seed a new model's classes


class FinetuneWidget(ProjectSession):
    """Fine-tune on corrections, keep model versions, re-segment what was not touched."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self._worker: Any = None
        self._reseg_worker: Any = None
        self._job: FinetuneJob | None = None
        self._curve: list[EpochReport] = []
        self._build()
        self._run.changed.connect(self._on_run_clicked)
        self._use.changed.connect(self._use_selected)
        self._reseg.changed.connect(self.resegment)
        self._start_session()
        self._role_defaults = (
            RoleDefault(self._image, napari.layers.Image, IMAGE, avoid=(UNCERTAINTY,)),
            RoleDefault(self._labels, napari.layers.Labels, PREDICTION, avoid=(REFERENCE,)),
        )

    def _build(self) -> None:
        defaults = FinetuneConfig()
        self._truth = create_widget(
            annotation="napari.layers.Labels", label="ground truth", options={"nullable": True}
        )
        self._truth.value = None
        self._truth.tooltip = (
            "Optional: a fully labelled layer of the same image; all its voxels train too"
        )
        models = [FROM_PREDICTION, *(e.name for e in list_models())]
        self._model = ComboBox(label="start from", value=FROM_PREDICTION, choices=models)
        self._epochs = SpinBox(label="epochs", value=defaults.epochs, min=1, max=500)
        self._steps = SpinBox(label="steps / epoch", value=defaults.steps_per_epoch, min=1,
                              max=10_000)  # fmt: skip
        self._lr = FloatSpinBox(label="learning rate", value=defaults.learning_rate, min=1e-6,
                                max=1.0, step=1e-4)  # fmt: skip
        self._lr.native.setDecimals(5)
        self._device = ComboBox(label="device", choices=DEVICES, value=defaults.device)
        self._precision = ComboBox(label="precision", choices=PRECISIONS, value=defaults.precision)
        self._precision.tooltip = (
            "auto: bfloat16 on CPUs with native support, float16 on CUDA, where a timed batch "
            "shows it faster; fp32 for full precision"
        )
        self._extend = CheckBox(label="add new classes", value=True)
        self._extend.tooltip = (
            "A correction with a class the model does not know (a new organ, say) adds that "
            "class to the model instead of stopping the round"
        )
        self._run = PushButton(text="Fine-tune")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self._use = PushButton(text="Use selected version")
        self._reseg = PushButton(text="Re-segment untouched")
        for label in (self._status, self._reviewed):
            fixed_width(label)
        self.extend([
            self._image, self._labels, self._truth, self._model, self._folder, self._open,
            self._reviewed, self._mark, self._mark_patch, self._epochs, self._steps, self._lr,
            self._device, self._precision, self._extend, self._run, self._progress, self._use,
            self._reseg,
            self._status,
        ])  # fmt: skip
        self._plot = CurvePlot()
        self._canvas = self._plot.canvas
        self.versions = VersionsTable()
        self.learning = LearningCurve()
        for w in (self._canvas, self.versions, self.learning.canvas):
            self.native.layout().addWidget(w)

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer pickers, then point them at the layers of the right role."""
        super().reset_choices(*args)
        apply_all(self._viewer, getattr(self, "_role_defaults", ()))

    # -- project ------------------------------------------------------------------------------
    def _error(self, text: str) -> None:
        show_error(f"Fine-tune: {text}")

    def open_project(self, *_: Any) -> bool:
        """Attach to the chosen labels layer: restore its project or start one."""
        layer, image = self._labels.value, self._image.value
        project: Project | None = None
        try:
            check_pair(layer, image)
            project = self._session_project(project_folder(self._folder.value), program=PROGRAM)
            project.lock()  # one writer per project: another window or a CLI round is refused
            if project.exists():
                state = restore(self._viewer, project, layer)
                msg = f"restored {len(state.versions)} versions, {len(state.reviewed)} reviewed"
            else:
                base = None if self._model.value == FROM_PREDICTION else str(self._model.value)
                state = new_state(layer, image, base, project)
                project.save(state)
                msg = "new project"
        except SegtoolError as exc:
            if project is not None and project is not self.project:
                project.unlock()
            show_error(f"Fine-tune: {exc}")
            return False
        self._attach(project, state, layer)
        self._status.value = f"{msg} in {project.folder.name}"
        return True

    # -- training -----------------------------------------------------------------------------
    @property
    def worker(self) -> Any:
        return self._worker

    @property
    def _chunked(self) -> bool:
        return isinstance(self.state, ChunkedState)

    def _image_data(self) -> Any:
        """The image as an array; left lazy (not read) for a chunked project."""
        image = self._image.value
        data = image.data[0] if image.multiscale else image.data
        return data if self._chunked else np.asarray(data)

    def _truth_data(self) -> np.ndarray | None:
        truth = self._truth.value
        if truth is None:
            return None
        assert self.state is not None
        if truth is self._layer:
            raise InputError("the ground truth must be another layer than the corrected one")
        if self._chunked:
            raise InputError(
                "a project larger than memory trains on its corrections only; leave 'ground "
                "truth' empty"
            )
        if truth.data.shape != self.state.labels.shape:
            raise InputError(
                f"ground truth '{truth.name}' has shape {truth.data.shape}, the "
                f"corrections {self.state.labels.shape}"
            )
        return np.array(truth.data, copy=True)

    def _collect_config(self) -> FinetuneJob:
        """Every input of a round, read on the main thread."""
        if self.state is None and not self.open_project():
            raise InputError("no project")
        assert self.state is not None
        assert self.project is not None
        config = FinetuneConfig(
            epochs=int(self._epochs.value),
            steps_per_epoch=int(self._steps.value),
            learning_rate=float(self._lr.value),
            device=str(self._device.value),
            precision=str(self._precision.value),
        )
        shape = self.state.labels.shape
        references = (
            ()
            if self._chunked
            else tuple(  # never copy a volume's worth
                np.array(layer.data, copy=True)
                for layer in self._viewer.layers
                if isinstance(layer, napari.layers.Labels)
                and role(layer) == REFERENCE
                and tuple(layer.data.shape) == shape
            )
        )
        return FinetuneJob(self._image_data(), self.state.snapshot(), self.project, config,
                           self._truth_data(), extend=bool(self._extend.value),
                           references=references)  # fmt: skip

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
            self._job = self._collect_config()
        except SegtoolError as exc:
            show_error(f"Fine-tune: {exc}")
            return None
        self._curve = []
        self._plot.show_reports(self._curve)
        job = self._job  # the core round on the snapshot: train and record (save=False)
        self._worker = create_worker(
            iter_correction_round, job.project, job.image, job.state, config=job.config,
            truth=job.truth, references=job.references, extend=job.extend, save=False,
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
            self._plot.show_reports(self._curve)

    def _on_trained(self, result: RoundResult) -> None:
        if self._closed:
            return
        if result.classes:
            show_info(f"Fine-tune: {result.classes}")
        self._progress.value = 100
        if self.state is None or self._job is None:  # the layer was closed; the version is saved
            return
        recorded = self._job.state  # the snapshot, with the version the round recorded
        self.state.versions = recorded.versions
        self.state.current_version = recorded.current_version
        self._dirty = True
        if result.promoted and self._chunked:
            self.resegment()  # first: a chunked save waits until the merge is done
        self.autosave()  # the live state (edits made during the round) with the new version
        self._refresh()
        if result.promoted:
            self._status.value = f"version {result.version} in use: re-segmenting..."
            if not self._chunked:
                self.resegment()
        else:
            show_warning(f"Fine-tune: {_not_used(result)}")
            self._status.value = f"version {result.version} kept, not used"
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
        chosen, version = self.versions.selected()
        if not chosen:
            show_info("Fine-tune: select a version in the table first")
            return
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
        if self._chunked:
            return self._resegment_boxes()
        worker = create_worker(
            iter_resegment, self.project, self._image_data(), self.state.snapshot(),
            device=str(self._device.value), precision=str(self._precision.value),
            _connect={"returned": self._merge, "errored": self._on_error},
        )  # fmt: skip
        self._side_workers.append(worker)
        return worker

    def _merge(self, out: Resegmentation | tuple[np.ndarray, np.ndarray]) -> None:
        """Main thread: the new prediction goes into the live state where nobody worked."""
        if self._closed or self.state is None or self._layer is None:
            return
        segmentation = Resegmentation(*out)
        # the model's output before this one: with the new one it is the Queue's
        # disagreement map (where the two latest versions differ)
        previous = self.state.machine.copy()
        previous.setflags(write=False)
        self._layer.metadata[PREVIOUS_KEY] = previous
        changed = merge_resegmentation(self.state, segmentation)  # protects edits made since
        # the model's new output is the baseline of the edit effort: effort stays what the
        # user changed, not what re-segmenting changed
        machine = self.state.machine.copy()
        machine.setflags(write=False)
        self._layer.metadata[ORIGINAL_KEY] = machine
        bump_version(self._layer)  # rewritten in place: the Review widget must recount
        self._layer.data = self.state.labels
        # last: its data event re-ranks the Queue, which must see the new labels and both
        # predictions in the metadata
        self._write_uncertainty(segmentation.uncertainty)
        self._dirty = True
        self.autosave()
        self._status.value = f"re-segmented: {changed} untouched voxels changed"

    def _resegment_boxes(self) -> Any:
        """Chunked: merge box by box in a worker with painting off; the layer follows."""
        assert self.project is not None
        assert self.state is not None
        if self._reseg_worker is not None:
            return self._reseg_worker
        layer = self._layer
        editable = bool(layer.editable) if layer is not None else True
        if layer is not None:
            layer.editable = False  # a dab and a merge of the same chunk would race
        device, precision = str(self._device.value), str(self._precision.value)
        # with flips the merge rewrites the boxes' uncertainty too (iter_resegment_boxes)
        flips = resegment_config(self.state, device=device, precision=precision).tta
        store = self.state.folder / UNCERTAINTY_STORE
        worker = create_worker(
            iter_resegment_boxes, self.project, self._image_data(), self.state.snapshot(),
            device=device, precision=precision,
            _connect={"yielded": self._on_box, "returned": self._merged_boxes,
                      "errored": self._on_error},
            _start_thread=False,
        )  # fmt: skip

        def finished() -> None:
            self._reseg_worker = None
            if layer is not None and not self._closed:
                layer.editable = editable
                layer.refresh()
            if flips and not self._closed:  # also after a cancel: the boxes done are new
                self._refresh_uncertainty(store)
            if not self._closed:
                self._dirty = True
                self.autosave()  # the merged boxes (all, or those done before a cancel)

        worker.finished.connect(finished)
        self._reseg_worker = worker
        self._side_workers.append(worker)
        self._status.value = "re-segmenting unlabelled boxes (painting paused)..."
        worker.start()
        return worker

    def autosave(self) -> None:
        """Save in a worker when something changed; not while a chunked merge runs (a save
        folds changed chunks into the painted mask, and would see half-merged boxes)."""
        if self._reseg_worker is None:
            super().autosave()

    def _on_box(self, step: Any) -> None:
        if self._closed or self._layer is None:
            return
        self._progress.value = round(100 * step.fraction)
        self._status.value = f"re-segmenting: box {step.done} / {step.total} (painting paused)"
        self._layer.refresh()

    def _merged_boxes(self, changed: int) -> None:
        if self._closed or self.state is None or self._layer is None:
            return
        bump_version(self._layer)  # rewritten in place: the Review widget must recount
        self._layer.metadata.pop(ORIGINAL_KEY, None)  # a volume is never copied as baseline
        self._layer.metadata.pop(PREVIOUS_KEY, None)  # nor as the disagreement's other side
        self._dirty = True  # saved when the worker has finished
        self._status.value = f"re-segmented: {changed} untouched voxels changed"

    def _refresh_uncertainty(self, store: Path) -> None:
        """Chunked: the Image layers showing the project's uncertainty ``store`` take it
        again (the data event re-ranks the Queue); none is added."""
        if not store.exists():
            return
        for layer in list(self._viewer.layers):
            if isinstance(layer, napari.layers.Image) and _shows(layer.data, store):
                layer.data = zarr.open_array(store, mode="r")

    def _write_uncertainty(self, data: np.ndarray) -> None:
        image = self._image.value
        if image is None:
            return
        write_uncertainty_layer(self._viewer, f"{image.name} uncertainty", data,
                                tuple(image.scale[-data.ndim :]),
                                tuple(image.translate[-data.ndim :]))  # fmt: skip

    # -- display ------------------------------------------------------------------------------
    def _show_versions(self, state: ProjectState | ChunkedState) -> None:
        self.versions.show_state(state)
        self.learning.show_state(state)


def _shows(data: Any, store: Path) -> bool:
    """Whether the layer data ``data`` is the zarr array at the root of ``store`` (a folder)."""
    if not isinstance(data, zarr.Array):
        return False
    try:
        root = Path(str(data.store.root))
    except AttributeError:  # not a local store
        return False
    return not data.path and root.resolve() == store.resolve()


def _not_used(result: RoundResult) -> str:
    """Why a version was kept but not put in use, and what the user can do."""
    if result.val_dice is None or result.baseline_dice is None:
        why = result.training.note or "it had no held-out corrections to be judged on"
        return (
            f"version {result.version} kept, not used: {why}; correct or review more slices, "
            "or select the version and click 'Use selected version' to switch anyway"
        )
    return (
        f"version {result.version} scored {result.val_dice:.3f} on held-out corrections, "
        f"below {result.baseline_dice:.3f}; kept the model in use (select the version and "
        "click 'Use selected version' to switch anyway)"
    )
