"""The Review widget's count of a large or lazy pair: block by block in a worker, in rounds.

A pair above the widget's in-memory size, or held in zarr or dask arrays, is counted by
:func:`~napari_segtool.metrics.tracker.iter_block_counts` in a worker, reading the live
arrays. Paint events meanwhile are counted on the units already read; a unit that an edit
touched while it was being read (:class:`~napari_segtool.metrics.tracker.EditStamps`) is
read again in another round, so the counts end equal to a from-scratch count.
:class:`BlockwiseCount` owns that state: the worker, its generation, the stamps, Cancel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import napari.layers
import numpy as np
from magicgui.widgets import Label, ProgressBar, PushButton
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer

from napari_segtool._widgets import _gc
from napari_segtool._widgets.roles import data_version
from napari_segtool.metrics import ConfusionTracker
from napari_segtool.metrics.tracker import BLOCK_VOXELS, BlockCounts, EditStamps, iter_block_counts

ROUND_DELAY_MS = 50  # pause before reading again the slices that edits spoilt mid-read
MAX_BANDS_2D = 256  # a 2D image counted in a worker is counted in up to this many row bands
CANCELLED = "count cancelled: press Recount for the numbers"

Pair = tuple[napari.layers.Labels, napari.layers.Labels]


def uncounted_trackers(
    pred: Any, ref: Any, baseline: np.ndarray | None
) -> tuple[ConfusionTracker, ConfusionTracker | None]:
    """Trackers of the pair (and of the edit effort against ``baseline``) with nothing counted.

    A 2D image is split into row bands (:func:`_band_rows`), so that its count too reports
    progress and can be cancelled between blocks.
    """
    band = None if pred.ndim >= 3 else _band_rows(pred.shape)
    tracker = ConfusionTracker(pred, ref, band_rows=band, count=False)
    effort = (
        None if baseline is None else ConfusionTracker(pred, baseline, band_rows=band, count=False)
    )
    return tracker, effort


class BlockwiseCount:
    """Count a pair's trackers block by block in a worker, while the user paints.

    Parameters
    ----------
    status, progress, button : magicgui widgets
        The dock's status line, progress bar and Recount button: the count shows its
        progress there, and the button reads "Cancel" while a count runs.
    on_done : callable
        Called on the main thread once every unit is counted (the trackers are complete).
    on_error : callable
        Shows an exception the worker raised.

    Attributes
    ----------
    tracker, effort : ConfusionTracker or None
        The trackers being counted (the pair's, the edit effort's); None when stopped.
    worker : GeneratorWorker or None
        The running round.
    stamps : EditStamps or None
        Edits against the blocks read meanwhile; kept after the count for undo and redo.
    recounting : int
        Generation of the count in flight (0: none).
    """

    def __init__(
        self,
        *,
        status: Label,
        progress: ProgressBar,
        button: PushButton,
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self._status, self._progress, self._button = status, progress, button
        self._on_done, self._on_error = on_done, on_error
        self.tracker: ConfusionTracker | None = None
        self.effort: ConfusionTracker | None = None
        self._layers: Pair | None = None
        self.generation = 0  # of the trackers: a new pair or a full recount makes a new one
        self.recounting = 0
        self.worker: Any = None
        self.stamps: EditStamps | None = None
        self._cancelled = False
        self._failed = False
        self.closed = False

    @property
    def busy(self) -> bool:
        """A round runs, or the count waits for its next one."""
        return self.worker is not None or bool(self.recounting)

    def start(self, tracker: ConfusionTracker, effort: ConfusionTracker | None,
              layers: Pair) -> None:  # fmt: skip
        """Count ``tracker`` and ``effort`` (of ``layers``' live arrays) from scratch."""
        self.stop()
        self.tracker, self.effort, self._layers = tracker, effort, layers
        self.stamps = EditStamps(tracker.n_units)
        self.recounting = self.generation
        self._start_round()

    def recount_undone(self, old: Any, pred: Any, ref: Any, baseline: np.ndarray | None) -> bool:
        """After an undo or redo of the pair being counted, count its units again.

        Returns False (and does nothing) where more than an undo or redo changed since the
        data versions ``old``: the pair then needs a count from scratch.
        """
        units = self._moved_units(old, pred, ref, baseline)
        if units is None or self.tracker is None or self.stamps is None:
            return False
        self.stamps.touch(units)  # spoils blocks of these units read before the undo
        self.tracker.uncount(units)
        if self.effort is not None:
            self.effort.uncount(units)
        self.recounting = self.generation
        self._start_round()
        return True

    def _moved_units(
        self, old: Any, pred: Any, ref: Any, baseline: np.ndarray | None
    ) -> set[int] | None:
        """Units an undo or redo changed, when that is all that changed (else None)."""
        tracker, effort = self.tracker, self.effort
        if old is None or self._layers is None or tracker is None:
            return None
        same = (
            tracker.pred is pred
            and tracker.ref is ref
            and (
                (effort is None and baseline is None)
                or (effort is not None and effort.ref is baseline)
            )
        )
        if not same:
            return None
        units: set[int] = set()
        for layer, before in zip(self._layers, old, strict=True):
            now = data_version(layer)
            if now == before:
                continue
            undo = getattr(layer, "_undo_history", None)
            redo = getattr(layer, "_redo_history", None)
            if len(now) < 6 or len(before) < 6 or now[:2] != before[:2] or undo is None:
                return None  # another napari, new data, or rewritten in place
            if now[2] == before[2] - 1 and redo:
                item = redo[-1]  # undone
            elif now[3] == before[3] - 1 and undo:
                item = undo[-1]  # redone
            else:
                return None
            units |= tracker.touched_units(item)
        return units or None

    def note_edit(self, atoms: Any) -> None:
        """A paint event while a round runs: blocks of its units read meanwhile are read again.

        napari tells before it writes: the edit is under way until the next turn of the event
        loop.
        """
        tracker, stamps = self.tracker, self.stamps
        if tracker is None or stamps is None or self.worker is None:
            return
        units = tracker.touched_units(atoms)
        stamps.begin(units)
        QTimer.singleShot(0, lambda: stamps.end(units))

    # -- rounds -------------------------------------------------------------------------------
    def _start_round(self) -> None:
        """Count the units not counted yet in a worker (one round; another follows if an edit
        spoilt some of them)."""
        tracker = self.tracker
        if self.worker is not None or tracker is None or self.stamps is None:
            return  # the running round starts the next one when it ends
        pending = tracker.pending
        if pending.size == 0:
            self._count_done()
            return
        generation = self.generation
        refs = [tracker.ref]
        if self.effort is not None:
            refs.append(self.effort.ref)
        worker = create_worker(
            iter_block_counts, tracker.pred, refs,
            units=pending.tolist(), band_rows=tracker.band_rows, stamps=self.stamps,
            block_voxels=BLOCK_VOXELS,
            _connect={"yielded": lambda blocks: self._on_block(blocks, generation),
                      "errored": lambda exc: self._on_count_error(exc, generation),
                      "finished": lambda: self._on_round_end(generation)},
            _start_thread=False,
        )  # fmt: skip
        self.worker = worker
        self._cancelled = self._failed = False
        self._button.text = "Cancel"
        self._show_progress()
        _gc.hold()  # no full collection of the viewer's objects while the worker allocates
        worker.start()

    def _on_block(self, blocks: list[BlockCounts], generation: int) -> None:
        """Take a block's counts for the units no edit touched while it was read."""
        if generation != self.generation or self.tracker is None or self.stamps is None:
            return
        block = blocks[0]
        accept = self.stamps.unchanged(block)
        staged = self._staged_units()  # a mouse stroke writes before it tells
        if staged:
            accept &= ~np.isin(np.arange(block.start, block.stop), sorted(staged))
        self.tracker.put(block, accept=accept)
        if self.effort is not None:
            self.effort.put(blocks[1], accept=accept)
        self._show_progress()

    def _staged_units(self) -> set[int]:
        """Units of edits napari has written but not announced yet (a stroke in progress)."""
        units: set[int] = set()
        if self._layers is None or self.tracker is None:
            return units
        for layer in self._layers:
            staged = getattr(layer, "_staged_history", None)  # private: best effort
            if staged:
                units |= self.tracker.touched_units(list(staged))
        return units

    def _show_progress(self) -> None:
        tracker = self.tracker
        if tracker is None or self._layers is None:
            return
        done, total = int(tracker.counted.sum()), tracker.n_units
        self._progress.value = round(100 * done / max(total, 1))
        what = "slices" if tracker.pred.ndim >= 3 else "bands"
        self._status.value = f"counting: {done} / {total} {what}"

    def _on_count_error(self, exc: Exception, generation: int) -> None:
        if generation != self.generation:
            return
        self._failed = True
        self._status.value = "cannot count"
        self._on_error(exc)

    def _on_round_end(self, generation: int) -> None:
        _gc.release()
        if generation != self.generation:
            return  # a newer pair or count: this worker was dropped
        self.worker = None
        if self._cancelled or self._failed:
            self.recounting = 0
            self._idle()
            if self._cancelled:
                self._status.value = CANCELLED
            return
        if self.tracker is not None and self.tracker.pending.size:
            # edits spoilt some blocks: read those units again once the edits have settled
            QTimer.singleShot(ROUND_DELAY_MS, lambda: self._next_round(generation))
        else:
            self._count_done()

    def _next_round(self, generation: int) -> None:
        if generation == self.generation and not self.closed:
            self._start_round()

    def _count_done(self) -> None:
        for tracker in (self.tracker, self.effort):
            if tracker is not None:
                tracker.compact()  # ids undone meanwhile go: the ids of a fresh count
        self.recounting = 0
        self._idle()
        self._on_done()

    # -- stopping -----------------------------------------------------------------------------
    def _idle(self) -> None:
        if self.closed:  # the Qt side may be gone already
            return
        self._button.text = "Recount"

    def stop(self) -> None:
        """Drop the count in flight (its late results are ignored), its trackers and stamps."""
        self.generation += 1
        self.recounting = 0
        self.stamps = None
        self.tracker = self.effort = None
        self._layers = None
        if self.worker is not None:
            self.worker.quit()
            self.worker = None
        self._idle()

    def cancel(self) -> None:
        """Stop counting after the current block; the numbers stay blank until a recount."""
        self._cancelled = True
        if self.worker is not None:
            self._status.value = "cancelling..."
            self.worker.quit()
        else:  # between two rounds
            self.generation += 1
            self.recounting = 0
            self._idle()
            self._status.value = CANCELLED

    def close(self) -> None:
        """The dock is closing: stop for good, and touch none of its widgets again."""
        self.closed = True
        self.stop()


def _band_rows(shape: tuple[int, ...]) -> int:
    """Rows per band of a 2D image counted in a worker: few bands, each within a block."""
    rows, width = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
    return max(1, min(-(-rows // MAX_BANDS_2D), BLOCK_VOXELS // max(width, 1)))
