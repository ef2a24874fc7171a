"""The Segment widget's path for images larger than memory: a chunked project that fills.

A lazy image layer (dask or zarr data, or a multiscale one: level 0 is segmented) or one above
:data:`~napari_segtool.config.LAZY_SEGMENT_VOXELS` is never read whole: :func:`lazy_job`
points it at the chunked project ``<image file>.segtool`` beside its file, :func:`run_lazy_job`
(the worker) opens or creates it and runs :func:`~napari_segtool.workflows.lazy_segment.
iter_segment_lazy` (on the whole image or a box of it), and :class:`LazyDisplay` shows
``state.labels`` as a Labels layer from the first report on, refreshes it when rows of the
displayed slice become final, and records the user's paint events into the project
(:func:`~napari_segtool.workflows.lazy_segment.record_paint`), also after the run.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import napari.layers
import numpy as np
import zarr
from napari.utils.notifications import show_info

from napari_segtool import config as segtool_config
from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.blocks import labels_dtype
from napari_segtool.io.chunked_state import ChunkedState
from napari_segtool.io.project import Project, default_project_dir
from napari_segtool.layer_roles import PREDICTION, ROLE_KEY
from napari_segtool.model import load_model
from napari_segtool.workflows.lazy_segment import (
    BlockProgress,
    LazyResult,
    iter_segment_lazy,
    open_chunked,
    record_paint,
)

#: The project folder of a chunked prediction layer (for the other widgets).
PROJECT_KEY = "segtool_project"


def level0(layer: napari.layers.Image) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale one)."""
    return layer.data[0] if layer.multiscale else layer.data


def is_lazy(layer: napari.layers.Image) -> bool:
    """Whether Segment must not read the layer whole: not numpy, or above the threshold."""
    data = level0(layer)
    return not isinstance(data, np.ndarray) or data.size > segtool_config.LAZY_SEGMENT_VOXELS


@dataclass(frozen=True)
class LazyJob:
    """A run on a lazy image, read from the widgets on the main thread."""

    image: Any
    image_name: str
    image_path: str
    folder: Path
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    model: str
    config: InferenceConfig
    cancel: threading.Event
    lock: threading.Lock
    region: tuple[slice, ...] | None = None  # segment only this box (level-0 voxels)


@dataclass(frozen=True)
class Ready:
    """First report of a lazy run: the project's state, to show before anything is written."""

    state: ChunkedState


@dataclass(frozen=True)
class LazyOutput:
    state: ChunkedState
    result: LazyResult | None  # None: cancelled


def lazy_job(
    layer: napari.layers.Image,
    *,
    model: str,
    config: InferenceConfig,
    region: tuple[slice, ...] | None = None,
) -> LazyJob:
    """The job for a lazy layer, or an :class:`InputError` saying how to make one work.

    With ``region`` (a box of level 0's voxels) only that box of the project is written.
    """
    path = getattr(layer.source, "path", None)
    voxels = f"{int(np.prod(level0(layer).shape)):,} voxels"
    if not path:
        raise InputError(
            f"'{layer.name}' ({voxels}) is too large to segment in memory, and it has no file "
            "for a project folder beside it: open it from a file (File > Open, e.g. an "
            "OME-Zarr), or convert it with `napari-segtool convert IMAGE OUT.ome.zarr` first"
        )
    if layer.rgb or level0(layer).ndim not in (2, 3):
        raise InputError(
            f"'{layer.name}' has shape {tuple(level0(layer).shape)}: a volume larger than memory "
            "is segmented as one channel, (Z, Y, X) or (Y, X)"
        )
    return LazyJob(
        image=level0(layer), image_name=layer.name, image_path=str(path),
        folder=default_project_dir(path), scale=tuple(layer.scale),
        translate=tuple(layer.translate), model=model, config=config,
        cancel=threading.Event(), lock=threading.Lock(), region=region,
    )  # fmt: skip


def run_lazy_job(job: LazyJob) -> Generator[Ready | BlockProgress, None, LazyOutput]:
    """Worker body: open or create the project, report it, then fill it block by block.

    Cancelling sets ``job.cancel``: the run stops after the current batch and its
    generator is closed here, so the record is saved before the worker ends.
    """
    model = load_model(job.model)
    project = Project(job.folder, program="napari-segtool segment")
    shape = tuple(int(s) for s in job.image.shape)
    state = open_chunked(
        project, shape=shape, dtype=labels_dtype(model), base_model=job.model,
        image={"name": job.image_name, "path": job.image_path, "shape": list(shape)},
    )  # fmt: skip
    import pandas  # noqa: F401  (as run_job: napari's first Labels layer imports it)

    yield Ready(state)

    gen = iter_segment_lazy(job.image, model, state=state, project=project, config=job.config,
                            uncertainty=job.config.tta, lock=job.lock,
                            region=job.region)  # fmt: skip
    try:
        while True:
            if job.cancel.is_set():
                return LazyOutput(state, None)
            try:
                p = next(gen)
            except StopIteration as stop:
                return LazyOutput(state, stop.value)
            yield p
    finally:
        gen.close()  # saves the record


class LazyDisplay:
    """The Labels layer over a chunked project: shown at once, refreshed, paint recorded."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self.layer: napari.layers.Labels | None = None
        self.state: ChunkedState | None = None
        self._lock: threading.Lock | None = None
        self.running = False

    def show(
        self, job: LazyJob, state: ChunkedState, metadata: dict[str, Any]
    ) -> napari.layers.Labels:
        """Add (or reuse) ``<image> prediction`` over ``state.labels``; record its painting.

        The layer's metadata gets ``metadata`` (the Segment widget's keys), its role and
        :data:`PROJECT_KEY`.
        """
        name = f"{job.image_name} prediction"
        layers = self._viewer.layers
        meta = {**metadata, ROLE_KEY: PREDICTION, PROJECT_KEY: str(state.folder)}
        old = next((la for la in layers if la.name == name), None)
        if old is not None and _same_store(old, state):
            old.data = state.labels
            old.metadata.update(meta)
            layer = old
        else:
            layer = self._viewer.add_labels(state.labels, name=name, scale=job.scale,
                                            translate=job.translate, metadata=meta)  # fmt: skip
            if old is not None:
                show_info(f"kept the layer '{name}'; the project's labels are '{layer.name}'")
        self.detach()
        self.layer, self.state, self._lock, self.running = layer, state, job.lock, True
        layer.events.paint.connect(self._on_paint)
        return layer

    def detach(self) -> None:
        if self.layer is not None:
            self.layer.events.paint.disconnect(self._on_paint)
        self.layer = self.state = None

    def _on_paint(self, event: Any) -> None:
        if self.state is not None:
            # while a run writes, the stroke is written again under the writer's lock
            record_paint(self.state, event.value, lock=self._lock, rewrite=self.running)

    def rows_final(self, rows: tuple[int, int]) -> None:
        """Refresh the layer when the rows that became final hold the displayed slice."""
        layer = self.layer
        a, b = rows
        if layer is None or a >= b:
            return
        if layer.ndim == 3:
            if self._viewer.dims.ndisplay != 2:
                return  # a 3D view reads the whole volume: refreshed at the end only
            point = self._viewer.dims.point[-layer.ndim :]
            z = round(float(layer.world_to_data(point)[0]))
            if not a <= z < b:
                return
        layer.refresh()

    def finished(self) -> None:
        self.running = False
        if self.layer is not None:
            self.layer.refresh()


def _same_store(layer: Any, state: ChunkedState) -> bool:
    data = layer.data
    return (
        isinstance(layer, napari.layers.Labels)
        and isinstance(data, zarr.Array)
        and str(data.store_path) == str(state.labels.store_path)
    )
