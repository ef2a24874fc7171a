"""The Queue dock widget: which slices or tiles to correct next, one click to go there.

It ranks the units (slices of a stack, tiles of a 2D image) of the prediction by the
uncertainty layer that Segment (with flip TTA) or Fine-tune's re-segmentation wrote, and
refreshes whenever that layer changes. Slices marked reviewed in the Fine-tune widget leave
the queue.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import napari
import napari.layers
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox, create_widget
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from napari_segtool._widgets._closing import on_close
from napari_segtool._widgets.roles import RoleDefault, apply_all, role
from napari_segtool.active_learning import STRATEGIES, Unit, make_units, rank, score_units
from napari_segtool.errors import InputError, SegtoolError
from napari_segtool.layer_roles import IMAGE, PREDICTION, REFERENCE, UNCERTAINTY

logger = logging.getLogger(__name__)

REVIEWED_KEY = "segtool_reviewed"  # set of reviewed slices, kept by the Fine-tune widget
SCORE_IN_WORKER = 2**20  # voxels above which ranking leaves the UI thread (~10 ms and more)


def check_uncertainty(name: str, data: np.ndarray, *, known: bool = False) -> None:
    """Refuse a layer that is not an uncertainty map: floating point, values in [0, 1].

    Ranking by a raw image's intensities would look like a queue and mean nothing. ``known``
    (a layer the plugin made) skips the pass over the values.
    """
    if known:
        return
    if data.dtype.kind != "f":
        raise InputError(
            f"'{name}' holds {data.dtype} values, not an uncertainty map in [0, 1]; pick the "
            "'... uncertainty' layer that Segment makes with flip TTA"
        )
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    if not (lo >= 0.0 and hi <= 1.0):
        raise InputError(
            f"'{name}' has values from {lo:.4g} to {hi:.4g}, not an uncertainty map in "
            "[0, 1]; pick the '... uncertainty' layer that Segment makes with flip TTA"
        )


class QueueWidget(Container):
    """Ranked list of units to correct next."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._labels = create_widget(annotation="napari.layers.Labels", label="prediction")
        self._uncertainty = create_widget(
            annotation="napari.layers.Image", label="uncertainty", options={"nullable": True}
        )
        self._uncertainty.value = None  # not the first image: that is usually the raw one
        self._strategy = ComboBox(label="strategy", choices=STRATEGIES, value="uncertainty")
        self._score = ComboBox(label="unit score", choices=("top 5 %", "mean"), value="top 5 %")
        self._score.tooltip = (
            "top 5 %: mean of a unit's most uncertain voxels (ranked best in our simulations); "
            "mean: mean over the whole unit"
        )
        self._length = SpinBox(label="show", value=10, min=1, max=10_000)
        self._gap = SpinBox(label="min gap", value=1, min=0, max=100)
        self._tile = SpinBox(label="tile (2D)", value=256, min=16, max=8192)
        self._seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self._refresh_button = PushButton(text="Rank")
        self._status = Label(label="", value="")
        self.extend([self._labels, self._uncertainty, self._strategy, self._score, self._length,
                     self._gap,
                     self._tile, self._seed, self._refresh_button, self._status])  # fmt: skip
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["unit", "score", "foreground"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(220)
        self.table.cellClicked.connect(self.jump_to)
        self.native.layout().addWidget(self.table)
        self.queue: list[Unit] = []
        self._watched: napari.layers.Image | None = None
        self._generation = 0  # of the latest ranking request
        self._ranking = 0  # generation of the ranking running in a worker (0: none)
        self._worker: Any = None
        self._closed = False
        self._refresh_button.changed.connect(self.refresh)
        for w in (self._strategy, self._score, self._length, self._gap, self._tile, self._seed):
            w.changed.connect(self.refresh)
        self._uncertainty.changed.connect(self._watch)
        self._labels.changed.connect(self.refresh)
        self._role_defaults = (
            RoleDefault(self._labels, napari.layers.Labels, PREDICTION, avoid=(REFERENCE,)),
            RoleDefault(self._uncertainty, napari.layers.Image, UNCERTAINTY, avoid=(IMAGE,)),
        )
        on_close(self.native, self._teardown)
        self._watch()

    def reset_choices(self, *args: Any) -> None:
        """Refresh the layer pickers, then point them at the layers of the right role."""
        super().reset_choices(*args)
        apply_all(self._viewer, getattr(self, "_role_defaults", ()))

    def _watch(self, *_: Any) -> None:
        """Re-rank whenever the uncertainty layer gets new data (a new Segment run)."""
        if self._closed:
            return
        if self._watched is not None:
            self._watched.events.data.disconnect(self.refresh)
        self._watched = self._uncertainty.value
        if self._watched is not None:
            self._watched.events.data.connect(self.refresh)
        self.refresh()

    def reviewed(self) -> set[int]:
        layer = self._labels.value
        if layer is None:
            return set()
        return {int(z) for z in layer.metadata.get(REVIEWED_KEY, ())}

    def refresh(self, *_: Any) -> list[Unit]:
        """Rank the units again from the current layers and controls.

        Small volumes are ranked here and the queue is returned; above
        :data:`SCORE_IN_WORKER` voxels the ranking runs in a worker, this returns ``[]`` and
        :attr:`queue` fills when it is done (:attr:`ranking` is True meanwhile). A newer
        request supersedes an older one still running.
        """
        self._generation += 1
        generation = self._generation
        request = self._collect()
        if request is None:
            return []
        if request.labels.size <= SCORE_IN_WORKER:
            try:
                order = request.rank()
            except SegtoolError as exc:
                self._on_error(exc, generation)
                return []
            return self._show(order, generation)
        self._status.value = "ranking..."
        self._ranking = generation
        # the labels may be painted meanwhile: the worker ranks a copy
        request = dataclasses.replace(request, labels=request.labels.copy())
        worker = create_worker(
            request.rank,
            _connect={"returned": lambda order: self._show(order, generation),
                      "errored": lambda exc: self._on_error(exc, generation)},
        )  # fmt: skip
        self._worker = worker
        return []

    @property
    def ranking(self) -> bool:
        """Whether a ranking is running in a worker for the latest request."""
        return self._ranking == self._generation

    def _collect(self) -> _Request | None:
        """Every layer and control value the ranking needs, read here on the main thread."""
        labels, unc = self._labels.value, self._uncertainty.value
        if labels is None:
            self._status.value = "pick the prediction (and its uncertainty layer)"
            return None
        data = np.asarray(labels.data)
        return _Request(
            labels=data,
            uncertainty=None if unc is None else np.asarray(unc.data),
            uncertainty_name="" if unc is None else unc.name,
            known=unc is not None and role(unc) == UNCERTAINTY,
            strategy=str(self._strategy.value),
            reduce="top" if str(self._score.value).startswith("top") else "mean",
            tile=None if data.ndim == 3 else int(self._tile.value),
            seed=int(self._seed.value),
            exclude=frozenset(self.reviewed()) if data.ndim == 3 else frozenset(),
            min_gap=int(self._gap.value),
        )

    def _show(self, order: list[Unit], generation: int) -> list[Unit]:
        if generation != self._generation or self._closed:
            return []  # superseded by a newer request, or closed
        self._ranking = 0
        self.queue = order[: int(self._length.value)]
        self._fill()
        done = len(self.reviewed())
        self._status.value = f"{len(order)} units left" + (f", {done} reviewed" if done else "")
        return self.queue

    def _on_error(self, exc: Exception, generation: int) -> None:
        if generation != self._generation or self._closed:
            return
        self._ranking = 0
        self._status.value = "cannot rank"
        show_error(f"Queue: {exc}")

    def _teardown(self) -> None:
        """Closed: stop following the uncertainty layer and drop a ranking in flight."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        if self._watched is not None:
            self._watched.events.data.disconnect(self.refresh)
            self._watched = None

    def _fill(self) -> None:
        self.table.setRowCount(len(self.queue))
        for row, u in enumerate(self.queue):
            for col, text in enumerate((u.label, f"{u.score:.4f}", f"{u.foreground:.3f}")):
                self.table.setItem(row, col, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def jump_to(self, row: int, _col: int = 0) -> None:
        """Show the unit of ``row``: its slice, or the tile centred and filling the view."""
        if not 0 <= row < len(self.queue):
            return
        unit = self.queue[row]
        layer = self._labels.value
        if len(unit.grid) == 1:
            self._viewer.dims.set_current_step(0, unit.grid[0])
            return
        ys, xs = unit.region
        scale = np.asarray(layer.scale[-2:]) if layer is not None else np.ones(2)
        offset = np.asarray(layer.translate[-2:]) if layer is not None else np.zeros(2)
        centre = offset + scale * np.array([(ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2])
        shape = np.asarray(layer.data.shape[-2:]) if layer is not None else np.ones(2)
        whole = float(np.max(shape * scale))
        extent = max((ys.stop - ys.start) * scale[0], (xs.stop - xs.start) * scale[1])
        self._viewer.reset_view()  # zoom that fits the whole image...
        fit = float(self._viewer.scene.camera.zoom)
        self._viewer.scene.camera.zoom = 0.9 * fit * whole / max(extent, 1e-9)  # ...then the tile
        self._viewer.scene.camera.center = tuple(float(c) for c in centre)


@dataclass(frozen=True)
class _Request:
    """One ranking, with everything read from the widgets: safe to run in a worker."""

    labels: np.ndarray
    uncertainty: np.ndarray | None
    uncertainty_name: str
    known: bool
    strategy: str
    reduce: str
    tile: int | None
    seed: int
    exclude: frozenset[int]
    min_gap: int

    def rank(self) -> list[Unit]:
        """The ranked units (any thread; reads no widget)."""
        if self.uncertainty is None:
            if self.strategy == "uncertainty":
                raise InputError(
                    "no uncertainty layer: segment with flip TTA first, or pick a random strategy"
                )
            unc = np.zeros(self.labels.shape, np.float32)
        else:
            unc = self.uncertainty
            if unc.shape != self.labels.shape:
                raise InputError(
                    f"uncertainty {unc.shape} and prediction {self.labels.shape} differ in "
                    "shape; pick the layers of one image"
                )
            check_uncertainty(self.uncertainty_name, unc, known=self.known)
        units = make_units(self.labels.shape, tile=self.tile)
        scored = score_units(units, unc, self.labels, reduce=self.reduce)
        return rank(scored, strategy=self.strategy, seed=self.seed, exclude=self.exclude,
                    min_gap=self.min_gap)  # fmt: skip
