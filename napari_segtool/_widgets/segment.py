"""The Segment dock widget: pick an image and a model, segment it in a worker thread."""

from __future__ import annotations

import logging
import math
import zlib
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
from napari_segtool.active_learning import voxel_uncertainty
from napari_segtool.config import (
    COMPILE_MODES,
    DEVICES,
    PRECISIONS,
    SEGMENT_REGIONS,
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
CHECKSUM_KEY = "segtool_checksum"
ORIGINAL_KEY = "segtool_original"  # frozen copy of the prediction: the Review widget's baseline
SOURCE_KEY = "segtool_source"
WHOLE, FIELD_OF_VIEW, RECTANGLE = SEGMENT_REGIONS
Box = tuple[slice, ...]


def checksum(data: np.ndarray) -> int:
    """Cheap fingerprint of a layer's data, to tell whether the user edited it since."""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1))


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


def write_uncertainty_layer(
    viewer: napari.viewer.Viewer,
    name: str,
    data: np.ndarray,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
) -> None:
    """Update the Image layer ``name`` with ``data``, or add it below every Labels layer.

    The uncertainty (magma, 0-1, additive, 60 % opacity) sits just under the lowest Labels
    layer, so it tints the image but never covers the labels being corrected.
    """
    layers = viewer.layers
    if name in layers and isinstance(layers[name], napari.layers.Image):
        layers[name].data = data
        return
    layer = viewer.add_image(
        data, name=name, scale=scale, translate=translate, colormap="magma",
        contrast_limits=(0.0, 1.0), blending="additive", opacity=0.6, visible=True,
        metadata={ROLE_KEY: UNCERTAINTY},
    )  # fmt: skip
    labels_at = [i for i, lyr in enumerate(layers) if isinstance(lyr, napari.layers.Labels)]
    if labels_at and labels_at[0] < layers.index(layer):
        layers.move(layers.index(layer), labels_at[0])


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


def voxel_range(lo: float, hi: float, n: int, *, touching: bool) -> slice:
    """The voxels of an axis of ``n`` (voxel ``i`` centred at ``i``) that ``[lo, hi]`` holds.

    Those whose centre lies inside, or with ``touching`` every one it overlaps; clipped to
    ``0:n`` (``start >= stop`` when none).

    Examples
    --------
    >>> voxel_range(-0.5, 9.5, 10, touching=False), voxel_range(2.2, 5.6, 10, touching=True)
    (slice(0, 10, None), slice(2, 7, None))
    >>> voxel_range(2.2, 5.6, 10, touching=False), voxel_range(11.0, 12.0, 10, touching=True)
    (slice(3, 6, None), slice(10, 10, None))
    """
    if touching:
        start, stop = math.floor(lo + 0.5), math.ceil(hi + 0.5)
    else:
        start, stop = math.ceil(lo - 1e-6), math.floor(hi + 1e-6) + 1
    return slice(min(max(start, 0), n), min(max(stop, 0), n))


def describe_region(box: Box) -> str:
    """``"2:5,0:40,10:64"``: a box as ``segment --region`` writes it."""
    return ",".join(f"{s.start}:{s.stop}" for s in box)


def place(crop: np.ndarray, region: Box, *, shape: tuple[int, ...],
          base: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """A new array of ``shape``: ``base`` (or zeros) with ``crop`` at ``region``."""
    if base is None:
        out = np.zeros(shape, crop.dtype)
    else:
        out = np.array(base, dtype=np.promote_types(base.dtype, crop.dtype))
    out[region] = crop
    return out


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
        self._job: SegmentJob | LazyJob | None = None
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
        self._region = ComboBox(label="region", choices=SEGMENT_REGIONS, value=WHOLE)
        self._shapes = create_widget(annotation="napari.layers.Shapes", label="rectangle in",
                                     options={"nullable": True})  # fmt: skip
        self._shapes.visible = False
        self._run = PushButton(text="Segment")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self._status = Label(label="", value="")
        self.extend([
            self._image, self._model, self._model_file, self._device, self._tile,
            self._overlap, self._batch, self._tta, self._precision, self._compile,
            self._region, self._shapes, self._run, self._progress, self._status,
        ])  # fmt: skip
        self._model.changed.connect(self._on_model_changed)
        self._region.changed.connect(self._on_region_changed)
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
        self._region.tooltip = (
            "whole image; field of view: the Y/X box the canvas shows now (2D view), through "
            "all Z of a stack; Shapes rectangle: the box of the selected (else the first) "
            "rectangle of the Shapes layer below, on its own Z slice if it was drawn on a slice "
            "of a stack, through all Z if the Shapes layer is 2D. The box is normalised like "
            "the whole image; outside it the prediction keeps its values (0 in a new layer)"
        )
        self._shapes.tooltip = "Shapes layer holding the rectangle (default: the selected layer)"
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

    def _collect_config(self) -> SegmentJob | LazyJob:
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
        if is_lazy(layer):
            return lazy_job(layer, model=self._model_spec(), config=config, region=region)
        image = np.asarray(level0(layer))
        base_labels = base_unc = None
        if region is not None:
            base_labels, base_unc = self._bases(layer.name, image.shape[: layer.ndim])
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
        mode = self._region.value
        if mode == WHOLE:
            return None
        shape = tuple(int(n) for n in level0(layer).shape[: layer.ndim])
        if mode == FIELD_OF_VIEW:
            box, what = self._field_of_view(layer, shape), "the field of view"
        else:
            box, what = self._rectangle(layer, shape)
        if any(s.start >= s.stop for s in box):
            raise InputError(
                f"{what} lies outside '{layer.name}' (shape {shape}): pan or zoom onto the "
                "image, or choose 'whole image'"
            )
        return box

    def _field_of_view(self, layer: napari.layers.Image, shape: tuple[int, ...]) -> Box:
        """The voxels the 2D canvas shows (from the camera and the canvas size); all Z."""
        viewer = self._viewer
        if viewer.dims.ndisplay != 2:
            raise InputError(
                "the field of view is that of a 2D view: switch the viewer to 2D (the 2D/3D "
                "button), or draw a Shapes rectangle and choose 'Shapes rectangle'"
            )
        height, width = (float(v) for v in viewer.canvas.size)
        zoom = float(viewer.scene.camera.zoom)
        if min(height, width) <= 0 or zoom <= 0:
            raise InputError("the canvas has no size yet: show the viewer, then segment again")
        cy, cx = (float(v) for v in viewer.scene.camera.center[-2:])
        ay, ax = viewer.dims.displayed[-2:]
        point = np.asarray(viewer.dims.point, float)
        corners = []
        for y in (cy - height / (2 * zoom), cy + height / (2 * zoom)):
            for x in (cx - width / (2 * zoom), cx + width / (2 * zoom)):
                world = point.copy()
                world[ay], world[ax] = y, x
                corners.append(layer.world_to_data(world))
        lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
        offset = viewer.dims.ndim - layer.ndim
        shown = {ay - offset, ax - offset}
        return tuple(
            voxel_range(lo[i], hi[i], n, touching=True) if i in shown else slice(0, n)
            for i, n in enumerate(shape)
        )

    def _rectangle(self, layer: napari.layers.Image, shape: tuple[int, ...]) -> tuple[Box, str]:
        """The box of a Shapes rectangle in ``layer``'s voxels (centres inside), and its name.

        Axes the rectangle spans take the voxels whose centres it holds; an axis of the
        Shapes layer on which it is flat (the slice it was drawn on) takes that one slice;
        axes the Shapes layer lacks (a 2D layer over a stack) are taken whole.
        """
        shapes = self._shapes.value
        active = self._viewer.layers.selection.active
        if shapes is None and isinstance(active, napari.layers.Shapes):
            shapes = active
        if shapes is None:
            raise InputError(
                "no Shapes layer: add one (the polygon button above the layer list), draw a "
                "rectangle, then segment again; or choose another region"
            )
        rects = [i for i, kind in enumerate(shapes.shape_type) if kind == "rectangle"]
        if not rects:
            raise InputError(
                f"'{shapes.name}' holds no rectangle: draw one with its rectangle tool (R)"
            )
        selected = sorted(i for i in shapes.selected_data if i in rects)
        index = selected[0] if selected else rects[0]
        world = [shapes.data_to_world(v) for v in np.asarray(shapes.data[index], float)]
        k = min(layer.ndim, shapes.ndim)
        point = np.asarray(self._viewer.dims.point, float)[-layer.ndim :]
        corners = []
        for w in world:
            full = point.copy()
            full[-k:] = np.asarray(w, float)[-k:]
            corners.append(layer.world_to_data(full))
        lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
        box, spanned = [], 0
        for i, n in enumerate(shape):
            if i < layer.ndim - k:
                box.append(slice(0, n))
            elif hi[i] - lo[i] > 1e-6 * max(1.0, abs(lo[i])):
                box.append(voxel_range(lo[i], hi[i], n, touching=False))
                spanned += 1
            else:  # flat along this axis: the slice it was drawn on
                z = round(float(lo[i]))
                box.append(slice(min(max(z, 0), n), min(max(z + 1, 0), n)))
        what = f"rectangle {index} of '{shapes.name}'"
        if spanned < min(2, layer.ndim):
            raise InputError(f"{what} has no area in '{layer.name}': draw it again, larger")
        return tuple(box), what

    def _bases(
        self, name: str, shape: tuple[int, ...]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What a region's outputs keep outside the box: this image's last machine prediction
        (the frozen baseline, never the user's edits) and uncertainty, where they fit."""
        by_name = {layer.name: layer for layer in self._viewer.layers}
        labels = unc = None
        pred = by_name.get(f"{name} prediction")
        if isinstance(pred, napari.layers.Labels):
            original = pred.metadata.get(ORIGINAL_KEY)
            if isinstance(original, np.ndarray) and original.shape == shape:
                labels = original
            elif (
                isinstance(pred.data, np.ndarray)
                and pred.data.shape == shape
                and (pred.metadata.get(CHECKSUM_KEY) == checksum(pred.data))
            ):
                labels = pred.data.copy()  # unedited, without a baseline: its data
        found = by_name.get(f"{name} uncertainty")
        if (
            isinstance(found, napari.layers.Image)
            and isinstance(found.data, np.ndarray)
            and (found.data.shape == shape)
        ):
            unc = found.data
        return labels, unc

    # -- running ------------------------------------------------------------------------------
    @property
    def worker(self) -> GeneratorWorker | None:
        """The running worker, if any (for tests and scripting)."""
        return self._worker

    def _on_model_changed(self, value: str) -> None:
        self._model_file.visible = value == FROM_FILE

    def _on_region_changed(self, value: str) -> None:
        self._shapes.visible = value == RECTANGLE

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
        worker = create_worker(
            run_lazy_job if lazy else run_job,
            job,
            _connect={
                "yielded": self._on_lazy_yielded if lazy else self._on_progress,
                "returned": self._on_lazy_returned if lazy else self._on_returned,
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
            if isinstance(self._job, LazyJob):
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
        self._status.value = f"{p.done} / {p.total} tiles"

    def _on_error(self, exc: Exception) -> None:
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
