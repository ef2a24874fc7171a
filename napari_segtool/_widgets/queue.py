"""The Queue dock widget: which slices, patches or tiles to correct next, one click to go there.

It ranks the units (slices or square patches of a stack, tiles of a 2D image) of the
prediction by a strategy (:data:`~napari_segtool.active_learning.select.STRATEGIES`): by the
uncertainty layer that Segment (with flip TTA) or Fine-tune's re-segmentation wrote, by that
uncertainty with diverse batches, by where the last two model versions disagree, by how rare
each voxel's class is among the reviewed units, or at random. It refreshes whenever the
uncertainty layer changes. Each row shows the unit's score and its expected effort (the sum
of the uncertainty over the unit: the voxels the user can expect to change). Clicking a row
shows the slice, or zooms to the patch; slices and patches marked reviewed in the Fine-tune
widget leave the queue. Large or lazy (zarr, dask) layers are scored block by block in a
worker, with progress and Cancel; nothing reads a whole volume at once.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import napari
import napari.layers
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from napari_segtool._widgets._closing import on_close
from napari_segtool._widgets.roles import RoleDefault, apply_all, role
from napari_segtool._widgets.segment_layers import ORIGINAL_KEY
from napari_segtool.active_learning import Unit, make_units, rank
from napari_segtool.active_learning.scoring import (
    ScoreProgress,
    ValueRangeError,
    iter_score_units,
)
from napari_segtool.active_learning.select import DEFAULT_STRATEGY, STRATEGIES
from napari_segtool.active_learning.signals import (
    BlockMap,
    class_counts,
    class_rarity,
    rarity_weights,
    version_change,
)
from napari_segtool.errors import InputError, SegtoolError
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.labelled import Patch
from napari_segtool.layer_roles import IMAGE, PREDICTION, REFERENCE, UNCERTAINTY
from napari_segtool.metrics.tracker import BLOCK_VOXELS

logger = logging.getLogger(__name__)

QUEUE_STRATEGIES = STRATEGIES  # all of simulate's, read from the layers
UNITS = ("slices", "patches")  # of a stack; a 2D image is always ranked by tiles
REVIEWED_KEY = "segtool_reviewed"  # set of reviewed slices, kept by the Fine-tune widget
REVIEWED_PATCHES_KEY = "segtool_reviewed_patches"  # set of (z, y0, y1, x0, x1), the same
FOCUS_KEY = "segtool_focus"  # (z, y0, y1, x0, x1) of the patch or tile the Queue last showed
# the model's prediction before the latest re-segmentation, set by the Fine-tune widget: with
# the current one (segment_layers.ORIGINAL_KEY) it gives the disagreement strategy its map
PREVIOUS_KEY = "segtool_previous"
FEATURES_GRID = 8  # as simulate: uncertainty-diverse compares units on 8 x 8 pooled maps
_OPEN: weakref.WeakSet[QueueWidget] = weakref.WeakSet()  # Queue docks, told of reviews


def reviewed_changed(layer: napari.layers.Labels) -> None:
    """Tell the open Queue widgets that ``layer``'s reviewed slices or patches changed (the
    Fine-tune widget calls this): the ones ranking that layer rank again."""
    for widget in list(_OPEN):
        widget._on_reviewed_changed(layer)


# voxels above which ranking leaves the UI thread (~10 ms and more); zarr and dask always do
SCORE_IN_WORKER = 2**20
_PICK = "pick the '... uncertainty' layer that Segment makes with flip TTA"


def check_uncertainty(name: str, data: Any, *, known: bool = False) -> None:
    """Refuse a layer that is not an uncertainty map: floating point, values in [0, 1].

    Ranking by a raw image's intensities would look like a queue and mean nothing. ``known``
    (a layer the plugin made) skips the check. The dtype is checked here; the values are
    checked while the units are scored (``value_range``), so a volume on disk is read once.
    """
    if not known and data.dtype.kind != "f":
        raise InputError(
            f"'{name}' holds {data.dtype} values, not an uncertainty map in [0, 1]; {_PICK}"
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
        self._strategy = ComboBox(label="strategy", choices=QUEUE_STRATEGIES,
                                  value=DEFAULT_STRATEGY)  # fmt: skip
        self._strategy.tooltip = (
            "uncertainty: most uncertain first; uncertainty-diverse: the shown list is a "
            "batch spread over what the units look like; disagreement: where the last two "
            "model versions differ (after a Fine-tune round); class-balanced: units showing "
            "classes rare among the reviewed units first; random and foreground-random: "
            "baselines. The default, disagreement, did best in our simulations (README), "
            "though no strategy beat random there with a confidence interval above zero."
        )
        self._units = ComboBox(label="units (3D)", choices=UNITS, value="slices")
        self._units.tooltip = "slices, or square patches of 'tile' within each slice"
        self._score = ComboBox(label="unit score", choices=("top 5 %", "mean"), value="top 5 %")
        self._score.tooltip = (
            "top 5 %: mean of a unit's most uncertain voxels (ranked best in our simulations); "
            "mean: mean over the whole unit"
        )
        self._length = SpinBox(label="show", value=10, min=1, max=10_000)
        self._gap = SpinBox(label="min gap", value=1, min=0, max=100)
        self._tile = SpinBox(label="tile / patch", value=256, min=16, max=8192)
        self._seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self._refresh_button = PushButton(text="Rank")
        # always shown: showing or hiding it would relayout the docks and redraw the canvas
        self._progress = ProgressBar(label="scored", value=0, min=0, max=100)
        self._status = Label(label="", value="")
        self.extend([self._labels, self._uncertainty, self._strategy, self._units, self._score,
                     self._length,
                     self._gap, self._tile, self._seed, self._refresh_button, self._progress,
                     self._status])  # fmt: skip
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["unit", "score", "effort", "foreground"])
        self.table.horizontalHeaderItem(2).setToolTip(
            "expected effort: the voxels you can expect to change, the unit's uncertainty "
            "summed (on our EM sample 1.2-1.4x the wrong voxels)"
        )
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
        self._refresh_button.changed.connect(self._on_rank_clicked)
        for w in (
            self._strategy,
            self._units,
            self._score,
            self._length,
            self._gap,
            self._tile,
            self._seed,
        ):
            w.changed.connect(self.refresh)
        self._uncertainty.changed.connect(self._watch)
        self._labels.changed.connect(self.refresh)
        self._role_defaults = (
            RoleDefault(self._labels, napari.layers.Labels, PREDICTION, avoid=(REFERENCE,)),
            RoleDefault(self._uncertainty, napari.layers.Image, UNCERTAINTY, avoid=(IMAGE,)),
        )
        on_close(self.native, self._teardown)
        _OPEN.add(self)
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

    def _on_reviewed_changed(self, layer: napari.layers.Labels) -> None:
        if not self._closed and layer is self._labels.value:
            self.refresh()

    def reviewed(self) -> set[int]:
        """Slices marked reviewed in the Fine-tune widget (0 for a reviewed 2D image)."""
        layer = self._labels.value
        if layer is None:
            return set()
        return {int(z) for z in layer.metadata.get(REVIEWED_KEY, ())}

    def reviewed_patches(self) -> set[Patch]:
        """Patches and tiles marked reviewed in the Fine-tune widget."""
        layer = self._labels.value
        if layer is None:
            return set()
        return {tuple(int(v) for v in p) for p in layer.metadata.get(REVIEWED_PATCHES_KEY, ())}

    def refresh(self, *_: Any) -> list[Unit]:
        """Rank the units again from the current layers and controls.

        Small in-memory volumes are ranked here and the queue is returned; above
        :data:`SCORE_IN_WORKER` voxels, or for zarr and dask layers, the units are scored
        block by block in a worker, this returns ``[]`` and :attr:`queue` fills when it is
        done (:attr:`ranking` is True meanwhile). A newer request cancels an older one.
        """
        self._generation += 1
        generation = self._generation
        self._stop_worker()
        request = self._collect()
        if request is None:
            return []
        lazy = _is_lazy(request.labels) or _is_lazy(request.uncertainty)
        if not lazy and request.labels.size <= SCORE_IN_WORKER:
            try:
                order = request.rank()
            except SegtoolError as exc:
                self._on_error(exc, generation)
                return []
            return self._show(order, generation, request.note)
        self._status.value = "ranking..."
        self._ranking = generation
        if not lazy:  # the labels may be painted meanwhile: the worker ranks a copy
            request = dataclasses.replace(request, labels=request.labels.copy())
        worker = create_worker(
            request.iter_rank,
            _connect={"yielded": lambda p: self._on_progress(p, generation),
                      "returned": lambda order: self._show(order, generation, request.note),
                      "errored": lambda exc: self._on_error(exc, generation),
                      "finished": lambda: self._on_finished(generation)},
        )  # fmt: skip
        self._worker = worker
        self._refresh_button.text = "Cancel"
        self._progress.value = 0
        return []

    def _on_rank_clicked(self, *_: Any) -> None:
        if self._worker is not None:
            self.cancel()
        else:
            self.refresh()

    def cancel(self) -> None:
        """Stop the ranking in flight after its current block."""
        if self._worker is None:
            return
        self._generation += 1  # its late answer is dropped
        self._stop_worker()
        self._status.value = "ranking cancelled"

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._worker = None
        self._ranking = 0
        self._refresh_button.text = "Rank"

    def _on_progress(self, p: ScoreProgress, generation: int) -> None:
        if generation != self._generation or self._closed:
            return
        self._progress.value = round(100 * p.done / max(p.total, 1))
        self._status.value = f"scoring: {p.done} / {p.total} units"

    def _on_finished(self, generation: int) -> None:
        if generation == self._generation and not self._closed:
            self._worker = None
            self._refresh_button.text = "Rank"

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
        data = _array(labels)
        slices = data.ndim == 3 and self._units.value == "slices"
        return _Request(
            labels=data,
            uncertainty=None if unc is None else _array(unc),
            uncertainty_name="" if unc is None else unc.name,
            known=unc is not None and role(unc) == UNCERTAINTY,
            strategy=str(self._strategy.value),
            reduce=_reduce(str(self._strategy.value), str(self._score.value)),
            tile=None if slices else int(self._tile.value),
            seed=int(self._seed.value),
            reviewed=frozenset(self.reviewed()),
            reviewed_patches=frozenset(self.reviewed_patches()),
            min_gap=int(self._gap.value),
            batch=int(self._length.value),
            current=labels.metadata.get(ORIGINAL_KEY),
            previous=labels.metadata.get(PREVIOUS_KEY),
        )

    def _show(self, order: list[Unit], generation: int, note: str = "") -> list[Unit]:
        if generation != self._generation or self._closed:
            return []  # superseded by a newer request, or closed
        self._ranking = 0
        self._progress.value = 100
        self.queue = order[: int(self._length.value)]
        self._fill()
        slices, patches = len(self.reviewed()), len(self.reviewed_patches())
        done = " and ".join(
            [f"{slices} slice{'s' * (slices != 1)}"] * bool(slices)
            + [f"{patches} patch{'es' * (patches != 1)}"] * bool(patches)
        )
        done += " reviewed" if done else ""
        self._status.value = (f"{len(order)} units left" + (f", {done}" if done else "")
                              + (f"; {note}" if note else ""))  # fmt: skip
        return self.queue

    def _on_error(self, exc: Exception, generation: int) -> None:
        if generation != self._generation or self._closed:
            return
        self._ranking = 0
        self.queue = []  # no stale list under an error
        self._fill()
        self._status.value = "cannot rank"
        show_error(f"Queue: {exc}")

    def _teardown(self) -> None:
        """Closed: stop following the uncertainty layer and drop a ranking in flight."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._generation += 1
        if self._worker is not None:
            self._worker.quit()
            self._worker = None
        if self._watched is not None:
            self._watched.events.data.disconnect(self.refresh)
            self._watched = None

    def _fill(self) -> None:
        self.table.setRowCount(len(self.queue))
        for row, u in enumerate(self.queue):
            effort = "-" if u.effort is None else f"{u.effort:,.0f}"
            for col, text in enumerate((u.label, f"{u.score:.4f}", effort, f"{u.foreground:.3f}")):
                self.table.setItem(row, col, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def jump_to(self, row: int, _col: int = 0) -> None:
        """Show the unit of ``row``: its slice, or the patch or tile centred and filling the
        view (its box becomes the one Fine-tune's 'Mark patch reviewed' marks)."""
        if not 0 <= row < len(self.queue):
            return
        unit = self.queue[row]
        layer = self._labels.value
        if len(unit.grid) != 2:
            self._viewer.dims.set_current_step(0, unit.grid[0])
        if len(unit.grid) == 1:
            if layer is not None:
                layer.metadata.pop(FOCUS_KEY, None)
            return
        if layer is not None:
            layer.metadata[FOCUS_KEY] = unit.box
        ys, xs = unit.region[-2:]
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

    labels: Any  # numpy, zarr or dask: read block by block
    uncertainty: Any | None
    uncertainty_name: str
    known: bool
    strategy: str
    reduce: str
    tile: int | None  # None: slices of a stack
    seed: int
    reviewed: frozenset[int]
    reviewed_patches: frozenset[Patch]
    min_gap: int
    batch: int = 10
    current: Any | None = None  # the model's latest prediction, for disagreement
    previous: Any | None = None  # the one before it

    @property
    def note(self) -> str:
        """What the user should know about this ranking (shown with the count)."""
        if self.strategy == "disagreement" and (self.current is None or self.previous is None):
            return "one model version so far: disagreement ranks at random until a round"
        return ""

    def rank(self) -> list[Unit]:
        """The ranked units (any thread; reads no widget)."""
        return run_to_end(self.iter_rank())

    def iter_rank(self) -> Generator[ScoreProgress, None, list[Unit]]:
        """:meth:`rank` as a generator: progress after each block of units scored."""
        unc = self.uncertainty
        if unc is None:
            if self.strategy.startswith("uncertainty"):
                raise InputError(
                    "no uncertainty layer: segment with flip TTA first, or pick a strategy that "
                    "does not need one"
                )
        else:
            if unc.shape != self.labels.shape:
                raise InputError(
                    f"uncertainty {unc.shape} and prediction {self.labels.shape} differ in "
                    "shape; pick the layers of one image"
                )
            check_uncertainty(self.uncertainty_name, unc, known=self.known)
        shape = tuple(int(n) for n in self.labels.shape)
        units = make_units(shape, tile=self.tile)
        by_uncertainty = self.strategy.startswith("uncertainty")
        score_map = unc if by_uncertainty else self._signal()
        check = not self.known  # the layer ranks, or its sum is the effort: [0, 1] either way
        try:
            scored = yield from iter_score_units(
                units, score_map, self.labels, reduce=self.reduce,
                value_range=(0.0, 1.0) if check else None, block_voxels=BLOCK_VOXELS,
                features_grid=FEATURES_GRID if self.strategy == "uncertainty-diverse" else None,
                effort=unc,
            )  # fmt: skip
        except ValueRangeError as exc:
            raise InputError(
                f"'{self.uncertainty_name}' has values from {exc.low:.4g} to {exc.high:.4g}, "
                f"not an uncertainty map in [0, 1]; {_PICK}"
            ) from exc
        exclude = {u.index for u in scored if self._is_reviewed(u)}
        return rank(scored, strategy=self.strategy, seed=self.seed, exclude=exclude,
                    min_gap=self.min_gap, batch=max(1, self.batch),
                    revealed=[u for u in scored if u.index in exclude])  # fmt: skip

    def _reviewed_regions(self) -> list[tuple[slice, ...]]:
        """The reviewed slices and patches as index regions (a reviewed 2D image whole)."""
        if len(self.labels.shape) == 2:
            if 0 in self.reviewed:
                return [(slice(None), slice(None))]
            return [(slice(y0, y1), slice(x0, x1)) for _, y0, y1, x0, x1 in self.reviewed_patches]
        regions = [(slice(z, z + 1),) for z in sorted(self.reviewed)]
        return regions + [(slice(z, z + 1), slice(y0, y1), slice(x0, x1))
                          for z, y0, y1, x0, x1 in sorted(self.reviewed_patches)
                          if z not in self.reviewed]  # fmt: skip

    def _is_reviewed(self, unit: Unit) -> bool:
        """Whether the user marked the unit's slice, or a patch holding the unit, reviewed."""
        if len(unit.grid) != 2 and unit.grid[0] in self.reviewed:
            return True
        if len(unit.grid) == 2 and self.reviewed == {0}:  # a 2D image marked reviewed whole
            return True
        if len(unit.grid) == 1:
            return False
        z, y0, y1, x0, x1 = unit.box
        return any(pz == z and py0 <= y0 and y1 <= py1 and px0 <= x0 and x1 <= px1
                   for pz, py0, py1, px0, px1 in self.reviewed_patches)  # fmt: skip

    def _signal(self) -> Any | None:
        """The per-voxel map of ``disagreement`` and ``class-balanced`` (None: random)."""
        if self.strategy == "disagreement":
            if self.current is None or self.previous is None:
                # one version so far: no unit differs, as in simulate's first round (the
                # order is then at random, foreground first; see note)
                return None
            return BlockMap(version_change, self.current, self.previous)
        if self.strategy == "class-balanced":
            seen = self._reviewed_regions()
            weights = rarity_weights(class_counts(self.labels, seen))
            return BlockMap(lambda lab: class_rarity(lab, weights), self.labels)
        return None


def _reduce(strategy: str, score: str) -> str:
    """How units are scored: class-balanced scores a class's share whatever *unit score*
    says, as in simulate (the top 5 % of a unit would be all one class)."""
    return "top" if score.startswith("top") and strategy != "class-balanced" else "mean"


def _array(layer: napari.layers.Layer) -> Any:
    """The layer's full-resolution array (level 0 of a multiscale one), as it is: not loaded."""
    return layer.data[0] if layer.multiscale else layer.data


def _is_lazy(arr: Any) -> bool:
    """zarr, dask and other array-likes: read block by block, never as a whole."""
    return arr is not None and not isinstance(arr, np.ndarray)
