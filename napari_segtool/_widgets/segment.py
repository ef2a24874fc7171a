"""The Segment dock widget: pick an image and a model, segment it in a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
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
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from napari_segtool._widgets import _gc
from napari_segtool._widgets.roles import RoleDefault, apply_all
from napari_segtool._widgets.segment_cluster import (
    ClusterJob,
    ClusterOutput,
    cluster_job,
    open_result,
    run_cluster_job,
)
from napari_segtool._widgets.segment_layers import (  # other widgets import these from here
    CHECKSUM_KEY,
    ORIGINAL_KEY,
    SOURCE_KEY,
    checksum,
    previous_outputs,
    write_uncertainty_layer,
)
from napari_segtool._widgets.segment_lazy import (
    LazyDisplay,
    LazyJob,
    LazyOutput,
    Ready,
    is_lazy,
    lazy_job,
    level0,
    run_lazy_job,
)
from napari_segtool._widgets.segment_region import Box, RegionChoice, describe_region, place
from napari_segtool.active_learning import voxel_uncertainty
from napari_segtool.cluster.background import CancelledError
from napari_segtool.config import (
    COMPILE_MODES,
    DEVICES,
    PRECISIONS,
    SEGMENT_WIDGET_DEFAULTS,
    InferenceConfig,
)
from napari_segtool.errors import InputError, SegtoolError
from napari_segtool.inference import Progress, iter_segment
from napari_segtool.inference.layout import channels_first
from napari_segtool.inference.normalize import percentile_range
from napari_segtool.io.medical import GEOMETRY_KEY
from napari_segtool.layer_roles import IMAGE, PREDICTION, ROLE_KEY, UNCERTAINTY
from napari_segtool.model import list_models, load_model

logger = logging.getLogger(__name__)

FROM_FILE = "model file..."


@dataclass(frozen=True)
class SegmentJob:
    """Everything a run needs, read from the widgets on the main thread."""

    image: np.ndarray
    rgb: bool
    image_name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    model: str
    config: InferenceConfig
    # the source file's spacing, origin and direction (medical images): the prediction keeps
    # it, so saving it writes the labels in the image's geometry
    geometry: dict[str, Any] | None = None
    # segment only this box (spatial voxels); outside it the outputs take these arrays'
    # values (the previous machine prediction and uncertainty of this image), else 0
    region: Box | None = None
    base_labels: np.ndarray | None = None
    base_uncertainty: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentOutput:
    """What the worker hands to the main thread: arrays ready to become layers."""

    labels: np.ndarray
    original: np.ndarray  # read-only copy of ``labels``: the Review widget's baseline
    checksum: int
    uncertainty: np.ndarray | None
    device: str
    execution: str = ""  # e.g. "bf16, channels-last, eager"


def describe_execution(execution: dict[str, object] | None) -> str:
    """``"bf16, channels-last, eager"`` from :attr:`Segmentation.execution` (for the status)."""
    if not execution:
        return ""
    fmt = str(execution.get("memory_format", "")).replace("_", "-")
    mode = "compiled" if execution.get("compiled") else "eager"
    return f"{execution.get('precision')}, {fmt}, {mode}"


def parse_tile_shape(text: str) -> tuple[int, ...] | None:
    """``"256, 256"`` -> ``(256, 256)``; empty -> None (the model's default)."""
    text = text.strip().lower().replace("x", ",")
    if not text or text == "model default":
        return None
    try:
        shape = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise InputError(
            f"tile shape {text!r} is not a list of integers; write e.g. 256, 256"
        ) from exc
    if not shape or any(v < 1 for v in shape):
        raise InputError(f"tile shape {text!r} needs positive integers, e.g. 256, 256")
    return shape


def run_job(job: SegmentJob) -> Generator[Progress, None, SegmentOutput]:
    """Worker body: load the model, segment, and prepare every array the layers need.

    The copies, the checksum and the uncertainty are computed here, not on the UI thread
    (on a 10-slice stack with flip TTA they held the window for about a second). With a
    region, the crop is normalised with the whole image's range (what a whole run uses) and
    the outputs are whole-image arrays again (:func:`place`).
    """
    model = load_model(job.model)
    if job.region is None:
        result = yield from iter_segment(job.image, model, config=job.config, rgb=job.rgb)
    else:
        net = model.config
        data, ch = channels_first(job.image, net.spatial_dims, net.in_channels, None, job.rgb)
        whole = percentile_range(data, model.normalization, channel_axis=ch)
        result = yield from iter_segment(job.image[job.region], model, config=job.config,
                                         rgb=job.rgb, value_range=whole)  # fmt: skip
    # napari's first Labels layer imports pandas (layer features): ~0.2 s that would
    # otherwise run on the UI thread when the layer is added
    import pandas  # noqa: F401

    labels = result.labels
    unc = voxel_uncertainty(result) if result.uncertainty is not None else None
    if job.region is not None:
        shape = tuple(job.image.shape[: len(job.region)])
        labels = place(labels, job.region, shape=shape, base=job.base_labels)
        if unc is not None:
            unc = place(unc, job.region, shape=shape, base=job.base_uncertainty)
    original = labels.copy()
    original.setflags(write=False)
    return SegmentOutput(
        labels, original, checksum(labels), unc, result.device,
        describe_execution(result.execution),
    )  # fmt: skip


class SegmentWidget(Container):
    """Segment the chosen image layer with a U-Net; the result becomes a Labels layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._worker: GeneratorWorker | None = None
        self._job: SegmentJob | LazyJob | ClusterJob | None = None
        self._lazy = LazyDisplay(napari_viewer)  # the chunked project's layer, if any
        defaults = SEGMENT_WIDGET_DEFAULTS
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._model = ComboBox(
            label="model",
            choices=[e.name for e in list_models()] + [FROM_FILE],
            value=list_models()[0].name,
        )
        # a model file, or a bioimage.io package napari-segtool exported (loaded from weights)
        self._model_file = FileEdit(
            label="model file", mode="r", filter="*.pt *.zip", visible=False
        )
        self._device = ComboBox(label="device", choices=DEVICES, value=defaults.device)
        self._tile = LineEdit(label="tile shape", value="model default")
        self._overlap = FloatSpinBox(
            label="overlap", value=defaults.overlap, min=0.0, max=0.9, step=0.05
        )
        self._batch = SpinBox(label="batch size", value=defaults.batch_size, min=1, max=512)
        self._tta = CheckBox(label="flip TTA", value=defaults.tta)
        self._precision = ComboBox(label="precision", choices=PRECISIONS, value=defaults.precision)
        self._compile = ComboBox(label="compile", choices=COMPILE_MODES, value=defaults.compile)
        self._region_choice = RegionChoice()
        self._region, self._shapes = self._region_choice.mode, self._region_choice.shapes
        self._scheduler = LineEdit(label="scheduler", value="")
        self._run = PushButton(text="Segment")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self._status = Label(label="", value="")
        self.extend([
            self._image, self._model, self._model_file, self._device, self._tile,
            self._overlap, self._batch, self._tta, self._precision, self._compile,
            self._region, self._shapes, self._scheduler, self._run, self._progress,
            self._status,
        ])  # fmt: skip
        self._model.changed.connect(self._on_model_changed)
        self._run.changed.connect(self._on_run_clicked)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._image.tooltip = "Image layer to segment (grey, RGB or a 3D stack)"
        self._tta.tooltip = "Average over flips; adds an '<image> uncertainty' layer"
        self._tile.tooltip = "Spatial tile, e.g. 256, 256 (2D model) or 32, 128, 128 (3D)"
        self._precision.tooltip = (
            "auto: bfloat16 on CPUs with native support, float16 on CUDA, where a timed batch "
            "shows it faster; fp32 for full precision"
        )
        self._compile.tooltip = (
            "torch.compile the network; auto compiles only jobs long enough to pay back the "
            "warm-up (never a single small image)"
        )
        self._scheduler.tooltip = (
            "empty: segment in this process; local:N (N worker processes here), "
            "tcp://HOST:PORT or a scheduler file: segment the image's file on that dask "
            "cluster into <name>_labels.zarr beside it (a rerun resumes)"
        )
        self.native.destroyed.connect(self.cancel)
        self._role_defaults = (
            RoleDefault(self._image, napari.layers.Image, IMAGE, avoid=(UNCERTAINTY,)),
        )

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer pickers, then point them at the layers of the right role."""
        super().reset_choices(*args)
        apply_all(self._viewer, getattr(self, "_role_defaults", ()))

    # -- reading the controls ---------------------------------------------------------------
    def _model_spec(self) -> str:
        if self._model.value == FROM_FILE:
            path = self._model_file.value
            if not path or str(path) in ("", "."):
                raise InputError("choose a model file, or pick a bundled model")
            return str(path)
        return str(self._model.value)

    def _collect_config(self) -> SegmentJob | LazyJob | ClusterJob:
        """The job: in memory, or into a chunked project for a lazy or very large layer."""
        layer = self._image.value
        if layer is None:
            raise InputError("no image layer: open an image first (File > Open Sample)")
        config = InferenceConfig(
            tile_shape=parse_tile_shape(self._tile.value),
            overlap=float(self._overlap.value),
            batch_size=int(self._batch.value),
            device=str(self._device.value),
            tta=bool(self._tta.value),
            precision=str(self._precision.value),
            compile=str(self._compile.value),
        )
        region = self._region_box(layer)
        if self._scheduler.value.strip():
            return cluster_job(layer, scheduler=self._scheduler.value, model=self._model_spec(),
                               config=config, region=region)  # fmt: skip
        if is_lazy(layer):
            return lazy_job(layer, model=self._model_spec(), config=config, region=region)
        image = np.asarray(level0(layer))
        base_labels = base_unc = None
        if region is not None:
            base_labels, base_unc = previous_outputs(
                self._viewer, layer.name, image.shape[: layer.ndim]
            )
        return SegmentJob(
            image=image,
            rgb=bool(layer.rgb),
            image_name=layer.name,
            scale=tuple(layer.scale),
            translate=tuple(layer.translate),
            model=self._model_spec(),
            geometry=layer.metadata.get(GEOMETRY_KEY),
            config=config,
            region=region,
            base_labels=base_labels,
            base_uncertainty=base_unc,
        )

    # -- the region -----------------------------------------------------------------------------
    def _region_box(self, layer: napari.layers.Image) -> Box | None:
        """The box of ``layer``'s (level-0) voxels to segment, or None for the whole image."""
        return self._region_choice.box(self._viewer, layer)

    # -- running ------------------------------------------------------------------------------
    @property
    def worker(self) -> GeneratorWorker | None:
        """The running worker, if any (for tests and scripting)."""
        return self._worker

    def _on_model_changed(self, value: str) -> None:
        self._model_file.visible = value == FROM_FILE

    def _on_run_clicked(self, *_: Any) -> None:
        if self._worker is not None:
            self.cancel()
        else:
            self.start()

    def start(self) -> GeneratorWorker | None:
        """Read the controls and start segmenting; errors become notifications."""
        if self._worker is not None:
            return self._worker
        try:
            job = self._collect_config()
        except SegtoolError as exc:
            show_error(str(exc))
            return None
        self._job = job
        lazy = isinstance(job, LazyJob)
        body, yielded, returned = (run_lazy_job, self._on_lazy_yielded, self._on_lazy_returned)
        if not lazy:
            body, yielded, returned = (run_job, self._on_progress, self._on_returned)
        if isinstance(job, ClusterJob):
            body, returned = run_cluster_job, self._on_cluster_returned
        worker = create_worker(
            body,
            job,
            _connect={
                "yielded": yielded,
                "returned": returned,
                "errored": self._on_error,
                "finished": self._on_finished,
            },
            _start_thread=False,
        )
        self._worker = worker
        self._run.text = "Cancel"
        self._progress.value = 0
        where = "" if job.region is None else f" [{describe_region(job.region)}]"
        self._status.value = f"segmenting {job.image_name}{where}..."
        _gc.hold()
        worker.start()
        return worker

    def cancel(self, *_: Any) -> None:
        """Stop the running worker after its current batch of tiles."""
        if self._worker is not None:
            self._status.value = "cancelling..."
            if isinstance(self._job, LazyJob | ClusterJob):
                self._job.cancel.set()  # the worker closes its run itself: the record is saved
            else:
                self._worker.quit()

    def _on_layer_removed(self, event: Any) -> None:
        if event.value is self._lazy.layer:
            self.cancel()  # the project keeps what was written; painting it stops
            self._lazy.detach()
        elif self._job is not None and event.value.name == self._job.image_name:
            self.cancel()

    def _on_progress(self, p: Progress) -> None:
        self._progress.value = round(100 * p.fraction)
        unit = "boxes on the cluster" if isinstance(self._job, ClusterJob) else "tiles"
        self._status.value = f"{p.done} / {p.total} {unit}"

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, CancelledError):
            job = self._job
            where = job.outputs["labels"] if isinstance(job, ClusterJob) else "the output"
            self._status.value = f"cancelled; finished boxes kept in {where}: run again to resume"
            return
        if isinstance(exc, SegtoolError):
            show_error(f"Segment: {exc}")
        else:
            logger.error("segmentation failed", exc_info=exc)
            show_error(f"Segment failed: {type(exc).__name__}: {exc}")
        self._status.value = "failed"

    def _on_finished(self) -> None:
        _gc.release()
        if isinstance(self._job, LazyJob):
            self._lazy.finished()
        if self._worker is not None and self._worker.abort_requested:
            self._status.value = "cancelled"
        # after the uncertainty layer, which _on_returned queued for the next turn
        QTimer.singleShot(0, self._idle)

    def _idle(self) -> None:
        self._worker = None
        self._run.text = "Segment"

    def _on_returned(self, result: SegmentOutput) -> None:
        job = self._job
        assert job is not None
        name = self._write_labels(f"{job.image_name} prediction", result, job)
        self._progress.value = 100
        how = f" ({result.execution})" if result.execution else ""
        self._status.value = f"done on {result.device}{how}: {name}"
        if result.uncertainty is not None:  # entropy and flip disagreement, for the Queue
            # in the next turn of the event loop: each layer's creation and first draw
            # (100-200 ms with software OpenGL) is then its own short stall, not one long one
            unc = result.uncertainty
            QTimer.singleShot(
                0, lambda: self._write_image(f"{job.image_name} uncertainty", unc, job)
            )

    # -- the lazy path (a chunked project that fills) -----------------------------------------
    def _on_lazy_yielded(self, item: Any) -> None:
        job = self._job
        assert isinstance(job, LazyJob)
        if isinstance(item, Ready):
            meta = {SOURCE_KEY: job.model, ORIGINAL_KEY: item.state.machine}
            layer = self._lazy.show(job, item.state, meta)
            self._status.value = f"segmenting {job.image_name} into {item.state.folder}..."
            logger.info("segmenting '%s' into %s as '%s'", job.image_name, item.state.folder,
                        layer.name)  # fmt: skip
            return
        self._on_progress(item)
        self._lazy.rows_final(item.rows)

    def _on_lazy_returned(self, output: LazyOutput) -> None:
        job = self._job
        assert isinstance(job, LazyJob)
        result = output.result
        if result is None:
            self._status.value = f"cancelled; what was written is in {output.state.folder}"
            return
        self._progress.value = 100
        name = self._lazy.layer.name if self._lazy.layer is not None else "(closed)"
        self._status.value = f"done: {name}, saved in {output.state.folder}"
        if result.uncertainty is not None:
            unc = result.uncertainty
            QTimer.singleShot(
                0,
                lambda: write_uncertainty_layer(
                    self._viewer, f"{job.image_name} uncertainty", unc, job.scale, job.translate
                ),
            )

    # -- the cluster path ---------------------------------------------------------------------
    def _on_cluster_returned(self, output: ClusterOutput) -> None:
        job = self._job
        assert isinstance(job, ClusterJob)
        blocks = output.summary["blocks"]
        self._progress.value = 100
        layer = open_result(self._viewer, job, output.path)
        self._status.value = (
            f"done on {output.summary['workers']} workers: {blocks['computed']} boxes computed, "
            f"{blocks['resumed']} resumed, {blocks['empty']} empty in "
            f"{output.summary['seconds']:.1f} s: {layer.name} ({output.path})"
        )

    # -- output layers ------------------------------------------------------------------------
    def _write_labels(self, name: str, result: SegmentOutput, job: SegmentJob) -> str:
        layers = self._viewer.layers
        labels = result.labels
        meta = {
            CHECKSUM_KEY: result.checksum,
            SOURCE_KEY: job.model,
            ORIGINAL_KEY: result.original,
            ROLE_KEY: PREDICTION,
        }
        if job.geometry is not None:
            meta[GEOMETRY_KEY] = job.geometry
        if name in layers:
            old = layers[name]
            unedited = (
                isinstance(old, napari.layers.Labels)
                and old.metadata.get(CHECKSUM_KEY) == checksum(old.data)
                and old.data.shape == labels.shape
            )
            if unedited:
                old.data = labels
                old.metadata.update(meta)
                return name
            new = self._viewer.add_labels(
                labels, name=name, scale=job.scale, translate=job.translate, metadata=meta
            )
            show_info(f"kept your edited layer '{name}'; the new prediction is '{new.name}'")
            return new.name
        layer = self._viewer.add_labels(
            labels, name=name, scale=job.scale, translate=job.translate, metadata=meta
        )
        return layer.name

    def _write_image(self, name: str, data: np.ndarray, job: SegmentJob) -> None:
        write_uncertainty_layer(self._viewer, name, data, job.scale, job.translate)
