"""Confusion counts kept up to date while a label image is edited, per class and per slice.

A full recount of a 512^3 pair takes tens of milliseconds; a paint event changes a few
thousand voxels. :class:`ConfusionTracker` updates its counts from the changed voxels only
(their old and new values, read from napari's paint-event history atoms), in time
proportional to the change, and gives exactly the counts a full recount would.

Counting reads the pair block by block along axis 0 (:func:`iter_blocks`, the one reading
loop of the package's blockwise counts, also under :mod:`~napari_segtool.metrics.blockwise`):
a few slices of a stack, or a band of rows of a 2D image, at a time, each block read once as
``np.asarray(arr[a:b])``. numpy, zarr and dask arrays are counted alike, with memory bounded by
a block whatever the volume's size, and the label ids that occur are found block by block too.
The counts are kept per *unit* (a slice of a stack; a band of ``band_rows`` rows of a 2D
image), so that units can be counted one at a time, e.g. in a worker thread while the user
paints, with :class:`EditStamps` telling which of a block's counts an edit made meanwhile
has spoilt.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.memory import check_allocation
from napari_segtool.io.paint import paint_changes
from napari_segtool.metrics.overlap import (
    check_pair,
    label_ids,
    label_index,
    macro_dice,
    overlap_metrics,
)

Which = Literal["pred", "ref"]

#: Voxels read per array and block when counting, evaluating or scoring a volume blockwise:
#: 16 MiB of uint8 labels. Blocks also follow the arrays' chunks along axis 0 where they can.
BLOCK_VOXELS = 1 << 24

_COUNT_CHUNK = 1 << 20  # voxels per bincount: short numpy calls leave the UI thread its GIL turns


def slice_confusion(
    pred: NDArray,
    ref: NDArray,
    n_classes: int | None = None,
    *,
    ids: NDArray[np.int64] | None = None,
) -> NDArray[np.int64]:
    """Confusion matrices per slice along axis 0: ``C[z, r, p]`` (a 2D pair is one slice).

    With ``ids`` (sorted label ids, e.g. from :func:`~napari_segtool.metrics.label_ids`, a
    superset of those that occur) rows and columns follow ``ids``; otherwise they are the
    label values ``0 .. n_classes-1``.

    Raises
    ------
    InputError
        If the counts would not fit in the available memory.
    """
    check_pair(pred, ref)
    p = pred if pred.ndim >= 3 else pred[np.newaxis]
    r = ref if ref.ndim >= 3 else ref[np.newaxis]
    z = p.shape[0]
    if ids is None:
        if n_classes is None:
            raise InputError("slice_confusion needs n_classes or ids")
        ids = np.arange(n_classes, dtype=np.int64)
    k = int(ids.size)
    check_allocation(
        z * k * k * 8,
        what=f"per-slice confusion counts of {z} slices x {k} x {k} label ids",
        hint="count over the ids that occur (ids=label_ids(pred, ref))",
    )
    out = np.zeros((z, k, k), np.int64)
    for s in range(z):  # one slice at a time: index temporaries stay slice-sized
        key = label_index(r[s], ids) * k + label_index(p[s], ids)
        out[s] = np.bincount(key.reshape(-1), minlength=k * k).reshape(k, k)
    return out


def tracked_ids(pred: NDArray, ref: NDArray) -> NDArray[np.int64]:
    """The label ids a :class:`ConfusionTracker` counts for a pair: those that occur, 0 and 1.

    >>> tracked_ids(np.array([0, 5]), np.array([117, 0]))
    array([  0,   1,   5, 117])
    """
    return np.union1d(label_ids(pred, ref), [1])


def _chunk_rows(arr: Any) -> int | None:
    """Chunk length along axis 0 of a zarr or dask array (None for numpy or unchunked)."""
    if isinstance(arr, np.ndarray):
        return None
    chunks = getattr(arr, "chunks", None)
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, tuple):  # dask: the chunk lengths along the axis
        return int(max(first)) if first else None
    return int(first)


def _points(arr: Any, idx: tuple[NDArray, ...]) -> NDArray:
    """Values of ``arr`` at the coordinates ``idx`` (numpy, zarr or dask)."""
    if isinstance(arr, np.ndarray):
        return arr[idx]
    vindex = getattr(arr, "vindex", None)  # zarr and dask: point-wise (not outer) indexing
    return np.asarray(vindex[idx] if vindex is not None else arr[idx])


def unit_rows(shape: Sequence[int], band_rows: int | None = None) -> int:
    """Rows along axis 0 per counting unit: 1 for a stack (a unit is a slice), else
    ``band_rows`` (default: all rows, one unit).

    >>> unit_rows((5, 64, 64)), unit_rows((100, 64)), unit_rows((100, 64), 16)
    (1, 100, 16)
    """
    if len(shape) == 0:
        raise InputError("a label image needs at least one axis")
    if len(shape) >= 3:
        return 1
    if band_rows is None:
        return max(int(shape[0]), 1)
    if int(band_rows) < 1:
        raise InputError(f"band_rows must be at least 1, got {band_rows}")
    return int(band_rows)


def _n_units(shape: Sequence[int], rows: int) -> int:
    """Units of ``rows`` rows along axis 0; a 2D image is at least one (maybe empty) unit."""
    n = -(-int(shape[0]) // rows)
    return n if len(shape) >= 3 else max(1, n)


def block_units(arr: Any, rows: int = 1, *, block_voxels: int = BLOCK_VOXELS) -> int:
    """Units of ``rows`` rows along axis 0 read per block of ``arr``.

    As many as fit in ``block_voxels`` voxels, at least one; rounded down to whole chunks of
    a zarr or dask ``arr`` along axis 0 where a chunk fits, so that no chunk is decoded twice.
    With ``rows=1`` it is the rows (slices of a stack) per block.

    Raises
    ------
    InputError
        If ``block_voxels`` is not positive.

    Examples
    --------
    >>> block_units(np.zeros((100, 10, 10)), block_voxels=3000)
    30
    >>> block_units(np.zeros((100, 10)), 4, block_voxels=3000)
    75
    """
    if block_voxels < 1:
        raise InputError(f"block_voxels must be positive, got {block_voxels}")
    plane = int(np.prod(tuple(arr.shape)[1:], dtype=np.int64))
    per = max(1, int(block_voxels) // max(rows * plane, 1))
    chunk = _chunk_rows(arr)
    if chunk and chunk % rows == 0 and per >= chunk // rows:
        per -= per % (chunk // rows)  # whole chunks: none is decoded twice
    return per


def _runs(units: NDArray[np.int64], per: int) -> Iterator[tuple[int, int]]:
    """Runs ``[start, stop)`` of consecutive units, cut at multiples of ``per``."""
    start = prev = -1
    for u in units.tolist():
        if start >= 0 and u == prev + 1 and u // per == start // per:
            prev = u
            continue
        if start >= 0:
            yield start, prev + 1
        start = prev = u
    if start >= 0:
        yield start, prev + 1


def _unit_counts(
    p: NDArray, r: NDArray, ids: NDArray[np.int64], rows: int, n: int
) -> NDArray[np.int64]:
    """Counts ``C[u, ref, pred]`` of the ``n`` units of one block (``rows`` rows each)."""
    k = int(ids.size)
    check_allocation(
        n * k * k * 8,
        what=f"confusion counts of {n} units x {k} x {k} label ids",
        hint="read smaller blocks (block_voxels); for instance labels (one id per object) use "
        "napari_segtool.metrics.instance_metrics",
    )
    out = np.zeros((n, k, k), np.int64)
    for u in range(n):
        key = slice(u * rows, (u + 1) * rows)
        pf, rf = p[key].reshape(-1), r[key].reshape(-1)
        for c in range(0, pf.size, _COUNT_CHUNK):
            flat = label_index(rf[c : c + _COUNT_CHUNK], ids) * k
            flat += label_index(pf[c : c + _COUNT_CHUNK], ids)
            out[u] += np.bincount(flat, minlength=k * k).reshape(k, k)
    return out


@dataclass(frozen=True)
class BlockCounts:
    """Confusion counts of the consecutive units ``start .. stop - 1``, read in one block.

    Attributes
    ----------
    start, stop : int
        The units counted (slices of a stack, bands of rows of a 2D image; in
        :func:`iter_blocks`, runs of ``rows`` rows along axis 0).
    ids : ndarray of int64
        Sorted label ids that occur in the block, 0 first: the rows and columns of ``counts``.
    counts : ndarray of int64, shape (stop - start, len(ids), len(ids))
        ``counts[i, r, p]``: voxels of unit ``start + i`` with reference id ``ids[r]`` and
        predicted id ``ids[p]``.
    token : tuple of two int64 arrays, or None
        The :meth:`EditStamps.snapshot` taken just before the block was read.
    """

    start: int
    stop: int
    ids: NDArray[np.int64]
    counts: NDArray[np.int64]
    token: tuple[NDArray[np.int64], NDArray[np.int64]] | None = None


class EditStamps:
    """Edit counters per unit, shared by the thread that edits and a thread that counts.

    The editing thread calls :meth:`begin` for the units an edit changes, no later than the
    first voxel is written (napari sends a paint event just before it writes), and
    :meth:`end` once every voxel is written; :meth:`touch` does both for an edit already
    written. The counting thread takes a :meth:`snapshot` just before it reads a block
    (:func:`iter_block_counts` does, given ``stamps``). Back on the editing thread,
    :meth:`unchanged` tells for each unit of the block whether its counts are good: no edit
    of the unit was under way when the block was read, and none has begun since.

    Notes
    -----
    The counters are numpy arrays read and written under the interpreter lock; an edit
    that is written *before* anyone is told (napari's mouse strokes, which announce their
    changes when the button is released) is invisible here: the caller must also refuse
    units with unannounced changes (the Review widget looks at the layer's staged history).
    """

    def __init__(self, n_units: int):
        self._started = np.zeros(int(n_units), np.int64)
        self._finished = np.zeros(int(n_units), np.int64)

    @staticmethod
    def _idx(units: Iterable[int]) -> NDArray[np.int64]:
        return np.unique(np.fromiter((int(u) for u in units), np.int64))

    def begin(self, units: Iterable[int]) -> None:
        """An edit of ``units`` starts (or is about to be written)."""
        self._started[self._idx(units)] += 1

    def end(self, units: Iterable[int]) -> None:
        """The edit of ``units`` that :meth:`begin` announced is written."""
        self._finished[self._idx(units)] += 1

    def touch(self, units: Iterable[int]) -> None:
        """An edit of ``units`` has been written (begin and end at once)."""
        idx = self._idx(units)
        self._started[idx] += 1
        self._finished[idx] += 1

    def snapshot(self, start: int, stop: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The counters of units ``start .. stop - 1``, just before they are read."""
        started = self._started[start:stop].copy()  # first started, then finished: see
        finished = self._finished[start:stop].copy()  # unchanged() for why the order matters
        return started, finished

    def unchanged(self, block: BlockCounts) -> NDArray[np.bool_]:
        """Per unit of ``block``: no edit under way at its snapshot, none begun since.

        With ``s`` started (read first) and ``f`` finished (read second) at the snapshot,
        ``s == f`` means every edit begun by then was written before the read began, and
        ``started == s`` now that none has begun since, so the block saw a settled unit.
        """
        if block.token is None:
            raise InputError("the block was counted without stamps (pass stamps=)")
        started, finished = block.token
        return (started == finished) & (self._started[block.start : block.stop] == started)


def iter_blocks(
    pred: Any,
    refs: Sequence[Any],
    *,
    rows: int = 1,
    units: Iterable[int] | None = None,
    block_voxels: int = BLOCK_VOXELS,
    stamps: EditStamps | None = None,
) -> Iterator[tuple[NDArray, list[NDArray], list[BlockCounts]]]:
    """Read ``pred`` and ``refs`` block by block along axis 0 and count each unit of a block.

    The one reading loop of the blockwise counts: :func:`iter_block_counts` (the tracker and
    the Review widget) and :mod:`~napari_segtool.metrics.blockwise` run it. A unit is ``rows``
    rows along axis 0; a block is a run of consecutive units within ``block_voxels`` voxels of
    each array, in whole chunks where they fit (:func:`block_units`), read once per array.

    Parameters
    ----------
    pred : array of int or bool
        numpy, zarr, dask, or any array with ``shape``, ``dtype`` and slicing along axis 0;
        read only as ``np.asarray(pred[a:b])``, once per block.
    refs : sequence of arrays
        References of the same shape; each block of ``pred`` is read once for all of them.
    rows : int
        Rows along axis 0 per unit: 1 counts each slice of a stack (or row of a 2D image) on
        its own; :func:`block_units` ``(pred)`` makes each block one unit.
    units : iterable of int, optional
        The units to count, default all (``ceil(len / rows)``; a 2D image has at least one).
    block_voxels : int
        Voxels per array and block (at least one unit is read at a time).
    stamps : EditStamps, optional
        Snapshot taken just before each block is read, into each :attr:`BlockCounts.token`.

    Yields
    ------
    p : ndarray
        ``pred[a:b]``, the rows of the block's units, in memory.
    rs : list of ndarray
        ``ref[a:b]`` of each reference.
    counts : list of BlockCounts
        The counts of the block's units against each reference.

    Raises
    ------
    InputError
        For arrays of different shapes or non-integer dtypes, a block with a negative label
        (checked as it is read), ``rows`` or ``block_voxels`` below 1, or a unit out of
        range.

    Examples
    --------
    >>> pred = np.array([[0, 1], [1, 1], [2, 0]])
    >>> [(len(p), b.counts.tolist()) for p, _, [b] in
    ...  iter_blocks(pred, [np.ones_like(pred)], rows=2, block_voxels=4)]
    [(2, [[[0, 0], [1, 3]]]), (1, [[[0, 0, 0], [1, 0, 1], [0, 0, 0]]])]
    """
    if not refs:
        raise InputError("iter_blocks needs at least one reference")
    for ref in refs:
        check_pair(pred, ref, values=False)
    shape = tuple(int(s) for s in pred.shape)
    if not shape:
        raise InputError("a label image needs at least one axis")
    if rows < 1:
        raise InputError(f"rows must be at least 1, got {rows}")
    n_units = _n_units(shape, rows)
    if units is None:
        todo = np.arange(n_units, dtype=np.int64)
    else:
        todo = np.unique(np.fromiter((int(u) for u in units), np.int64))
        if todo.size and (todo[0] < 0 or todo[-1] >= n_units):
            raise InputError(f"units {todo[0]}..{todo[-1]} are outside 0..{n_units - 1}")
    per = block_units(pred, rows, block_voxels=block_voxels)
    for start, stop in _runs(todo, per):
        token = stamps.snapshot(start, stop) if stamps is not None else None
        a, b = start * rows, min(stop * rows, shape[0])
        p = np.asarray(pred[a:b])
        rs: list[NDArray] = []
        out: list[BlockCounts] = []
        for ref in refs:
            r = np.asarray(ref[a:b])
            check_pair(p, r)  # the values of this block
            ids = label_ids(p, r)
            counts = _unit_counts(p, r, ids, rows, stop - start)
            rs.append(r)
            out.append(BlockCounts(start, stop, ids, counts, token))
        yield p, rs, out
        del p, r, rs, out  # not held here while the next block is read


def iter_block_counts(
    pred: Any,
    refs: Sequence[Any],
    *,
    units: Iterable[int] | None = None,
    band_rows: int | None = None,
    block_voxels: int = BLOCK_VOXELS,
    stamps: EditStamps | None = None,
) -> Iterator[list[BlockCounts]]:
    """Count ``pred`` against each of ``refs`` block by block: one list per block read.

    Parameters
    ----------
    pred : array of int or bool, shape (Z, Y, X) or (Y, X)
        numpy, zarr or dask; read only as ``np.asarray(pred[a:b])``, once per block.
    refs : sequence of arrays
        References of the same shape (e.g. the reference and the model's original output);
        each block of ``pred`` is read once for all of them.
    units : iterable of int, optional
        The units to count (slices of a stack, bands of ``band_rows`` rows of a 2D image);
        default all. Consecutive units are read together.
    band_rows : int, optional
        Rows per unit of a 2D image (default all rows: one unit); ignored for stacks.
    block_voxels : int
        Voxels per array and block (at least one unit is read at a time); rounded to the
        arrays' chunks along axis 0 where a chunk fits.
    stamps : EditStamps, optional
        Snapshot taken just before each block is read, into each
        :attr:`BlockCounts.token`.

    Yields
    ------
    list of BlockCounts
        One per reference, for the same units; the block is read when the generator
        resumes, and closing it stops before the next read.

    Raises
    ------
    InputError
        For arrays of different shapes or non-integer dtypes, a block with a negative label
        (checked as it is read), ``block_voxels`` below 1, or a unit out of range.

    Examples
    --------
    >>> pred = np.array([[[0, 1], [1, 1]], [[0, 0], [0, 2]]])
    >>> [(b.start, b.stop, b.ids.tolist(), int(b.counts.sum())) for [b] in
    ...  iter_block_counts(pred, [np.zeros_like(pred)], block_voxels=4)]
    [(0, 1, [0, 1], 4), (1, 2, [0, 2], 4)]
    """
    if not refs:
        raise InputError("iter_block_counts needs at least one reference")
    rows = unit_rows(tuple(int(s) for s in pred.shape), band_rows)
    blocks = iter_blocks(pred, refs, rows=rows, units=units, block_voxels=block_voxels,
                         stamps=stamps)  # fmt: skip
    for p, rs, counted in blocks:
        del p, rs  # only the counts leave: no block of labels is held during the next read
        yield counted


class ConfusionTracker:
    """Per-slice confusion counts of an edited label image against a reference.

    Parameters
    ----------
    pred, ref : array of int
        The label image being edited and the reference, same shape, ``(Y, X)`` or
        ``(Z, Y, X)``: numpy, zarr or dask (read block by block, see
        :func:`iter_block_counts`). The tracker keeps references to both arrays (napari
        paints into the layer's array in place) and reads the *other* array at changed
        voxels.
    band_rows : int, optional
        A 2D image is counted in bands of this many rows, each recountable on its own
        (default: one band); a stack is always counted per slice.
    count : bool
        False: start with no unit counted (:attr:`complete` False), to count later with
        :meth:`iter_recount` or :meth:`put`; no voxel is read here.

    Attributes
    ----------
    ids : ndarray of int64
        The label ids counted, sorted, 0 and 1 always included: ``confusion[z, i, j]`` counts
        the voxels of slice ``z`` with reference id ``ids[i]`` and predicted id ``ids[j]``.
        Painting a new id adds a row and a column; the table's size follows the number of
        ids in use, not the largest id.
    counts : ndarray of int64, shape (n_units, len(ids), len(ids))
        The counts per unit (per slice of a stack; per band of a 2D image).
    counted : ndarray of bool, shape (n_units,)
        Which units' counts are current; paint events leave the others alone.

    Notes
    -----
    Call :meth:`apply_atoms` with the ``value`` of a ``Labels.events.paint`` event, after the
    layer's data has changed, naming which array was painted; call :meth:`recount` after
    anything that changes the data without a paint event (undo, redo, ``layer.data = ...``),
    or :meth:`uncount` and :meth:`iter_recount` for the units it changed.
    """

    def __init__(
        self, pred: Any, ref: Any, *, band_rows: int | None = None, count: bool = True
    ) -> None:
        self.pred = pred
        self.ref = ref
        self._band_request = band_rows
        self._reset()
        if count:
            self.recount()

    def _reset(self) -> None:
        """No unit counted; ids 0 and 1."""
        check_pair(self.pred, self.ref, values=False)
        self.band_rows = unit_rows(self.pred.shape, self._band_request)
        n = _n_units(self.pred.shape, self.band_rows)
        self.ids = np.array([0, 1], np.int64)
        self.counts = np.zeros((n, 2, 2), np.int64)
        self.counted = np.zeros(n, bool)

    # -- state ---------------------------------------------------------------------------------
    @property
    def confusion(self) -> NDArray[np.int64]:
        """Counts per slice along axis 0, ``(Z, k, k)`` (a 2D pair is one slice)."""
        if self.pred.ndim >= 3:
            return self.counts
        return self.counts.sum(0, keepdims=True)

    @property
    def n_classes(self) -> int:
        """Number of label ids counted (``len(ids)``)."""
        return int(self.ids.size)

    @property
    def n_slices(self) -> int:
        return int(self.pred.shape[0]) if self.pred.ndim >= 3 else 1

    @property
    def n_units(self) -> int:
        """Units counted on their own: slices of a stack, bands of a 2D image."""
        return int(self.counts.shape[0])

    @property
    def complete(self) -> bool:
        """Whether every unit is counted (the metrics are those of the whole image)."""
        return bool(self.counted.all())

    @property
    def pending(self) -> NDArray[np.intp]:
        """Units not counted yet, in order."""
        return np.flatnonzero(~self.counted)

    def recount(self, pred: Any | None = None, ref: Any | None = None) -> None:
        """Count everything again, block by block (optionally switching to new arrays)."""
        if pred is not None:
            self.pred = pred
        if ref is not None:
            self.ref = ref
        for _ in self.iter_recount():
            pass

    def iter_recount(
        self, units: Iterable[int] | None = None, *, block_voxels: int = BLOCK_VOXELS
    ) -> Generator[tuple[int, int], None, None]:
        """Count ``units`` (default: all, from scratch) here, yielding ``(done, total)`` units.

        Closing the generator stops before the next block; the units not reached stay
        uncounted (:attr:`pending`).
        """
        if units is None:
            self._reset()
            todo = np.arange(self.n_units)
        else:
            todo = np.unique(np.fromiter((int(u) for u in units), np.int64))
            self.uncount(todo)
        done, total = 0, int(todo.size)
        blocks = iter_block_counts(
            self.pred, [self.ref], units=todo, band_rows=self.band_rows,
            block_voxels=block_voxels,
        )  # fmt: skip
        for [block] in blocks:
            self.put(block)
            done += block.stop - block.start
            yield done, total

    def uncount(self, units: Iterable[int]) -> None:
        """Forget the counts of ``units`` (their data changed without a paint event)."""
        idx = np.fromiter((int(u) for u in units), np.int64)
        self.counts[idx] = 0
        self.counted[idx] = False

    def put(self, block: BlockCounts, *, accept: NDArray[np.bool_] | None = None) -> int:
        """Take the counts of a block (those of the units ``accept`` allows); return how many.

        Label ids of the block that the tracker has not counted yet add rows and columns.
        """
        n = block.stop - block.start
        if block.counts.shape != (n, block.ids.size, block.ids.size):
            raise InputError(
                f"counts of shape {block.counts.shape} do not fit units "
                f"{block.start}..{block.stop - 1} and {block.ids.size} ids"
            )
        units = np.arange(block.start, block.stop)
        counts = block.counts
        if accept is not None:
            keep = np.asarray(accept, bool)
            units, counts = units[keep], counts[keep]
        if units.size == 0:
            return 0
        # ids of the units taken only: a refused unit's ids may be gone when it is read again
        used = (counts.sum((0, 1)) + counts.sum((0, 2))) > 0
        used[0] = True
        if not used.all():
            counts = counts[:, used][:, :, used]
        ids = block.ids[used]
        self._add_ids(ids)
        pos = np.searchsorted(self.ids, ids)
        self.counts[units] = 0
        self.counts[units[:, None, None], pos[None, :, None], pos[None, None, :]] = counts
        self.counted[units] = True
        return int(units.size)

    def touched_units(self, atoms: Iterable[Any]) -> set[int]:
        """Units (slices of a stack, bands of a 2D image) that paint-history atoms change."""
        n0 = int(self.pred.shape[0])
        rows = self.band_rows
        out: set[int] = set()
        for change in paint_changes(atoms):
            if self.pred.ndim >= 3:
                out |= change.planes(n0)
            elif change.box is not None:
                a, b, _ = change.box[0].indices(n0)
                if b > a:
                    out |= set(range(a // rows, (b - 1) // rows + 1))
            else:
                assert change.indices is not None
                out |= {int(u) for u in np.unique(np.asarray(change.indices[0]) // rows)}
        return out

    def adopt(
        self,
        confusion: NDArray[np.int64],
        pred: Any,
        ref: Any,
        *,
        ids: NDArray[np.int64] | None = None,
    ) -> None:
        """Take per-slice counts computed elsewhere and point the tracker at ``pred``, ``ref``.

        ``confusion`` comes e.g. from a tracker built on copies in a worker (its
        ``confusion``, with its :attr:`ids`) or from
        ``slice_confusion(pred, ref, ids=tracked_ids(pred, ref))``; pass the same ``ids``.
        Without ``ids`` the tracker keeps its own when they fit the counts' shape (adopting
        its own counts for new arrays), else the rows are label values ``0 .. k-1`` (the
        dense ``slice_confusion(pred, ref, k)``). A 2D pair becomes one unit.
        """
        check_pair(pred, ref)
        n_slices = pred.shape[0] if pred.ndim >= 3 else 1
        if confusion.ndim != 3 or confusion.shape[0] != n_slices:
            raise InputError(f"counts of shape {confusion.shape} do not fit {pred.shape}")
        if ids is None:
            own = getattr(self, "ids", None)
            if own is not None and confusion.shape[1:] == (own.size, own.size):
                ids = own
            else:
                ids = np.arange(confusion.shape[1], dtype=np.int64)
        ids = np.asarray(ids, np.int64)
        if confusion.shape[1:] != (ids.size, ids.size):
            raise InputError(f"counts of shape {confusion.shape} do not fit {ids.size} label ids")
        self.pred, self.ref, self.ids = pred, ref, ids
        self._band_request = None
        self.band_rows = unit_rows(pred.shape)
        self.counts = confusion
        self.counted = np.ones(confusion.shape[0], bool)

    def compact(self) -> None:
        """Drop the label ids no voxel of either image holds any more (0 and 1 stay).

        After it the ids are those a from-scratch count would have (:func:`tracked_ids`),
        when every unit is counted.

        >>> tr = ConfusionTracker(np.array([[0, 5]]), np.array([[0, 0]]))
        >>> _ = tr.apply_indices((np.array([0]), np.array([1])), np.array([5]), 0, which="pred")
        >>> tr.ids.tolist(), (tr.compact(), tr.ids.tolist())[1]
        ([0, 1, 5], [0, 1])
        """
        used = (self.counts.sum((0, 1)) + self.counts.sum((0, 2))) > 0
        used[np.isin(self.ids, [0, 1])] = True
        if not used.all():
            self.counts = np.ascontiguousarray(self.counts[:, used][:, :, used])
            self.ids = self.ids[used]

    def _add_ids(self, new: NDArray[np.int64]) -> None:
        """Add rows and columns for label ids not counted yet."""
        missing = np.setdiff1d(new, self.ids)
        if not missing.size:
            return
        ids = np.union1d(self.ids, missing)
        where = np.searchsorted(ids, self.ids)
        old = self.counts
        check_allocation(
            old.shape[0] * ids.size * ids.size * 8,
            what=f"confusion counts of {old.shape[0]} units x {ids.size} x {ids.size} label ids",
            hint="the images hold that many distinct ids; for instance labels (one id per "
            "object) use napari_segtool.metrics.instance_metrics",
        )
        self.counts = np.zeros((old.shape[0], ids.size, ids.size), np.int64)
        self.counts[:, where[:, None], where[None, :]] = old
        self.ids = ids

    def _index(self, *values: NDArray) -> list[NDArray[np.intp]]:
        """Positions of label values in :attr:`ids`, adding ids not yet counted."""
        self._add_ids(label_ids(*values))
        return [label_index(np.asarray(v), self.ids) for v in values]

    # -- updates -------------------------------------------------------------------------------
    def apply_atoms(self, atoms: Iterable[Any], *, which: Which = "pred") -> int:
        """Update the counts from napari paint-history atoms; return the voxels changed.

        Atoms are read by :func:`~napari_segtool.io.paint.paint_changes`: tuples
        ``(indices, old_values, new_value)`` or objects with ``slice_key``, ``mask``,
        ``old_values`` and ``new_value``. Changes in units not counted yet are left out
        (their count, when it comes, reads them).
        """
        n = 0
        for change in paint_changes(atoms):
            if change.indices is not None:
                n += self.apply_indices(
                    change.indices, change.old_values, change.new_value, which=which
                )
            else:
                assert change.box is not None
                n += self.apply_box(
                    change.box, change.mask, change.old_values, change.new_value, which=which
                )
        return n

    def apply_indices(
        self, indices: Sequence[NDArray], old_values: NDArray, new_value: Any, *, which: Which
    ) -> int:
        """Voxels at ``indices`` changed from ``old_values`` to ``new_value`` in ``which``."""
        old = np.asarray(old_values).reshape(-1)
        if old.size == 0:
            return 0
        idx = tuple(i.reshape(-1) for i in np.broadcast_arrays(*map(np.asarray, indices)))
        new = np.broadcast_to(np.asarray(new_value), old.shape)
        unit = idx[0].astype(np.int64, copy=False) // self.band_rows
        keep = self.counted[unit]
        n = int(old.size)
        if not keep.all():
            idx = tuple(i[keep] for i in idx)
            old, new, unit = old[keep], new[keep], unit[keep]
            if old.size == 0:
                return n
        other = _points(self.ref if which == "pred" else self.pred, idx).reshape(-1)
        self._update(unit, other, old, new, which)
        return n

    def apply_box(
        self,
        slice_key: Sequence[slice],
        mask: NDArray[np.bool_] | None,
        old_values: NDArray,
        new_value: Any,
        *,
        which: Which,
    ) -> int:
        """Voxels of the box ``slice_key`` (under ``mask``) changed to ``new_value``."""
        box = tuple(slice_key)
        old = np.asarray(old_values).reshape(-1)
        a0, a1, _ = box[0].indices(int(self.pred.shape[0]))
        rows = self.band_rows
        units = range(a0 // rows, (a1 - 1) // rows + 1) if a1 > a0 else range(0)
        if not any(self.counted[u] for u in units):
            return int(old.size)
        other_box = np.asarray((self.ref if which == "pred" else self.pred)[box])
        if mask is None:
            other = other_box.reshape(-1)
        else:
            mask = np.asarray(mask, bool)
            other = other_box[mask]
        if old.size != other.size:
            raise InputError(
                f"paint atom has {old.size} old values for {other.size} voxels of its box"
            )
        if old.size == 0:
            return 0
        new = np.asarray(new_value)
        per_voxel = new.ndim > 0 and new.size == old.size
        if per_voxel:
            new = new.reshape(-1)
        # values are in C order, so each unit's rows of the box are one contiguous run
        start = 0
        for u, count in self._box_segments(units, a0, a1, mask, other_box.shape, old.size):
            end = start + count
            if count and self.counted[u]:
                seg_new = new[start:end] if per_voxel else new
                self._update_unit(u, other[start:end], old[start:end], seg_new, which)
            start = end
        return int(old.size)

    def _box_segments(
        self,
        units: range,
        a0: int,
        a1: int,
        mask: NDArray[np.bool_] | None,
        box_shape: tuple[int, ...],
        size: int,
    ) -> list[tuple[int, int]]:
        """``(unit, number of changed voxels)`` for the units a box's rows ``a0 .. a1`` span."""
        if len(units) == 1:  # one slice or band: no need to count per row
            return [(units[0], size)]
        if mask is None:
            per_row = np.full(a1 - a0, int(np.prod(box_shape[1:])))
        else:
            per_row = mask.reshape(mask.shape[0], -1).sum(1)
        rows = self.band_rows
        out = []
        for u in units:
            lo, hi = max(a0, u * rows) - a0, min(a1, (u + 1) * rows) - a0
            out.append((u, int(per_row[lo:hi].sum())))
        return out

    def _update_unit(
        self, u: int, other: NDArray, old: NDArray, new: NDArray, which: Which
    ) -> None:
        """One unit's voxels changed from ``old`` to ``new`` (a scalar or one per voxel)."""
        other, old, new = self._index(other, old, new)
        k = self.n_classes
        cm = self.counts[u]
        if k == 2 and new.ndim == 0:  # binary masks, one painted label: four counts suffice
            self._update_binary(cm, other != 0, old != 0, int(new), which)
            return
        other = other.astype(np.intp, copy=False)
        before = np.bincount(other * k + old, minlength=k * k).reshape(k, k)
        if which == "pred":  # cm[ref, pred]
            cm -= before
        else:
            cm -= before.T
        if new.ndim == 0:  # a brush or fill paints one label: count the other image only
            col = np.bincount(other, minlength=k)
            if which == "pred":
                cm[:, int(new)] += col
            else:
                cm[int(new), :] += col
            return
        after = np.bincount(other * k + np.broadcast_to(new, old.shape), minlength=k * k)
        after = after.reshape(k, k)
        cm += after if which == "pred" else after.T

    @staticmethod
    def _update_binary(
        cm: NDArray, other: NDArray[np.bool_], old: NDArray[np.bool_], new: int, which: Which
    ) -> None:
        n = other.size
        n_other = int(np.count_nonzero(other))
        n_old = int(np.count_nonzero(old))
        both = int(np.count_nonzero(other & old))
        # before[o, v]: voxels with other-image class o and old value v
        before = np.array([[n - n_other - n_old + both, n_old - both], [n_other - both, both]])
        col = np.array([n - n_other, n_other])
        if which == "pred":  # cm[ref, pred]
            cm -= before
            cm[:, new] += col
        else:
            cm -= before.T
            cm[new, :] += col

    def _update(
        self, unit: NDArray, other: NDArray, old: NDArray, new: NDArray, which: Which
    ) -> None:
        other, old, new = self._index(other, old, new)
        k = self.n_classes
        z = unit.astype(np.int64, copy=False)
        other = other.astype(np.int64, copy=False)
        old = old.astype(np.int64, copy=False)
        new = new.astype(np.int64, copy=False)
        if which == "pred":  # C[u, ref, pred]
            before = (z * k + other) * k + old
            after = (z * k + other) * k + new
        else:
            before = (z * k + old) * k + other
            after = (z * k + new) * k + other
        flat = self.counts.reshape(-1)
        size = flat.size
        if size <= 8 * before.size:
            flat -= np.bincount(before, minlength=size)
            flat += np.bincount(after, minlength=size)
        else:  # many slices or classes: touch only the cells that change
            keys, counts = np.unique(before, return_counts=True)
            flat[keys] -= counts
            keys, counts = np.unique(after, return_counts=True)
            flat[keys] += counts

    # -- results -------------------------------------------------------------------------------
    def totals(self) -> NDArray[np.int64]:
        """Confusion matrix of the whole image."""
        return self.counts.sum(0)

    def metrics(self, slice_index: int | None = None) -> dict[str, object]:
        """Overlap metrics of the whole image, or of one slice along axis 0."""
        cm = self.totals() if slice_index is None else self.confusion[slice_index]
        return overlap_metrics(confusion=cm, ids=self.ids)

    def slice_dice(self) -> NDArray[np.float64]:
        """Macro foreground Dice per slice (1.0 where a slice has no foreground at all)."""
        return macro_dice(self.confusion)


def iter_confusion_tracker(
    pred: Any,
    ref: Any,
    *,
    band_rows: int | None = None,
    block_voxels: int = BLOCK_VOXELS,
) -> Generator[tuple[int, int], None, ConfusionTracker]:
    """Build a :class:`ConfusionTracker` block by block, yielding ``(done, total)`` units.

    The generator's return value is the tracker (``run_to_end`` or ``yield from`` gives
    it). Memory beyond the counts is bounded by one block of each array; closing the
    generator cancels before the next block.

    >>> gen = iter_confusion_tracker(np.ones((3, 2, 2), np.uint8), np.ones((3, 2, 2), np.uint8),
    ...                              block_voxels=8)
    >>> next(gen), next(gen)
    ((2, 3), (3, 3))
    """
    tracker = ConfusionTracker(pred, ref, band_rows=band_rows, count=False)
    yield from tracker.iter_recount(block_voxels=block_voxels)
    return tracker
