"""Confusion counts kept up to date while a label image is edited, per class and per slice.

A full recount of a 512^3 pair takes tens of milliseconds; a paint event changes a few
thousand voxels. :class:`ConfusionTracker` updates its counts from the changed voxels only
(their old and new values, read from napari's paint-event history atoms), in time
proportional to the change, and gives exactly the counts a full recount would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


class ConfusionTracker:
    """Per-slice confusion counts of an edited label image against a reference.

    Parameters
    ----------
    pred, ref : ndarray of int
        The label image being edited and the reference, same shape, ``(Y, X)`` or
        ``(Z, Y, X)``. The tracker keeps references to both arrays (napari paints into the
        layer's array in place) and reads the *other* array at changed voxels.

    Attributes
    ----------
    ids : ndarray of int64
        The label ids counted, sorted, 0 and 1 always included: ``confusion[z, i, j]`` counts
        the voxels of slice ``z`` with reference id ``ids[i]`` and predicted id ``ids[j]``.
        Painting a new id adds a row and a column; the table's size follows the number of
        ids in use, not the largest id.
    confusion : ndarray of int64, shape (Z, len(ids), len(ids))

    Notes
    -----
    Call :meth:`apply_atoms` with the ``value`` of a ``Labels.events.paint`` event, after the
    layer's data has changed, naming which array was painted; call :meth:`recount` after
    anything that changes the data without a paint event (undo, redo, ``layer.data = ...``).
    """

    def __init__(self, pred: NDArray, ref: NDArray):
        check_pair(pred, ref)
        self.pred = pred
        self.ref = ref
        self.recount()

    # -- state ---------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Number of label ids counted (``len(ids)``)."""
        return int(self.confusion.shape[1])

    @property
    def n_slices(self) -> int:
        return int(self.confusion.shape[0])

    def recount(self, pred: NDArray | None = None, ref: NDArray | None = None) -> None:
        """Count everything again (optionally switching to new arrays)."""
        if pred is not None:
            self.pred = pred
        if ref is not None:
            self.ref = ref
        check_pair(self.pred, self.ref)
        self.ids = tracked_ids(self.pred, self.ref)
        self.confusion = slice_confusion(self.pred, self.ref, ids=self.ids)

    def adopt(
        self,
        confusion: NDArray[np.int64],
        pred: NDArray,
        ref: NDArray,
        *,
        ids: NDArray[np.int64] | None = None,
    ) -> None:
        """Take counts computed elsewhere and point the tracker at ``pred`` and ``ref``.

        ``confusion`` comes e.g. from a tracker built on copies in a worker (its
        ``confusion``, with its :attr:`ids`) or from
        ``slice_confusion(pred, ref, ids=tracked_ids(pred, ref))``; pass the same ``ids``.
        Without ``ids`` the tracker keeps its own when they fit the counts' shape (adopting
        its own counts for new arrays), else the rows are label values ``0 .. k-1`` (the
        dense ``slice_confusion(pred, ref, k)``).
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
        self.pred, self.ref, self.confusion, self.ids = pred, ref, confusion, ids

    def _index(self, *values: NDArray) -> list[NDArray[np.intp]]:
        """Positions of label values in :attr:`ids`, adding ids not yet counted."""
        new = label_ids(*values)
        missing = np.setdiff1d(new, self.ids)
        if missing.size:
            ids = np.union1d(self.ids, missing)
            where = np.searchsorted(ids, self.ids)
            old = self.confusion
            check_allocation(
                old.shape[0] * ids.size * ids.size * 8,
                what=f"confusion counts for {ids.size} label ids",
            )
            self.confusion = np.zeros((old.shape[0], ids.size, ids.size), np.int64)
            self.confusion[:, where[:, None], where[None, :]] = old
            self.ids = ids
        return [label_index(np.asarray(v), self.ids) for v in values]

    # -- updates -------------------------------------------------------------------------------
    def apply_atoms(self, atoms: Iterable[Any], *, which: Which = "pred") -> int:
        """Update the counts from napari paint-history atoms; return the voxels changed.

        Atoms are read by :func:`~napari_segtool.io.paint.paint_changes`: tuples
        ``(indices, old_values, new_value)`` or objects with ``slice_key``, ``mask``,
        ``old_values`` and ``new_value``.
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
        idx = tuple(np.asarray(i) for i in indices)
        old = np.asarray(old_values).reshape(-1)
        if old.size == 0:
            return 0
        other = (self.ref if which == "pred" else self.pred)[idx].reshape(-1)
        z = idx[0].reshape(-1) if self.pred.ndim >= 3 else np.zeros(old.size, np.int64)
        new = np.broadcast_to(np.asarray(new_value), old.shape)
        self._update(z, other, old, new, which)
        return int(old.size)

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
        other_box = (self.ref if which == "pred" else self.pred)[box]
        old = np.asarray(old_values).reshape(-1)
        if mask is None:
            other = other_box.reshape(-1)
            counts_per_plane = None
        else:
            mask = np.asarray(mask, bool)
            other = other_box[mask]
            counts_per_plane = None
            if self.pred.ndim >= 3:
                counts_per_plane = (
                    np.array([old.size])  # one plane thick: no need to count
                    if mask.shape[0] == 1
                    else mask.reshape(mask.shape[0], -1).sum(1)
                )
        if old.size != other.size:
            raise InputError(
                f"paint atom has {old.size} old values for {other.size} voxels of its box"
            )
        if old.size == 0:
            return 0
        new = np.asarray(new_value)
        if self.pred.ndim < 3:
            self._update_plane(0, other, old, new, which)
            return int(old.size)
        z0 = box[0].start or 0
        if counts_per_plane is None:
            plane = int(np.prod(other_box.shape[1:]))
            counts_per_plane = np.full(other_box.shape[0], plane)
        # values are in C order, so each plane of the box is one contiguous run
        start = 0
        for i, count in enumerate(counts_per_plane.tolist()):
            if count:
                end = start + count
                self._update_plane(z0 + i, other[start:end], old[start:end], new, which)
                start = end
        return int(old.size)

    def _update_plane(
        self, z: int, other: NDArray, old: NDArray, new: NDArray, which: Which
    ) -> None:
        """One slice's voxels changed from ``old`` to ``new`` (a scalar or one per voxel)."""
        other, old, new = self._index(other, old, new)
        k = self.n_classes
        cm = self.confusion[z]
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
        self, z: NDArray, other: NDArray, old: NDArray, new: NDArray, which: Which
    ) -> None:
        other, old, new = self._index(other, old, new)
        k = self.n_classes
        z = z.astype(np.int64, copy=False)
        other = other.astype(np.int64, copy=False)
        old = old.astype(np.int64, copy=False)
        new = new.astype(np.int64, copy=False)
        if which == "pred":  # C[z, ref, pred]
            before = (z * k + other) * k + old
            after = (z * k + other) * k + new
        else:
            before = (z * k + old) * k + other
            after = (z * k + new) * k + other
        flat = self.confusion.reshape(-1)
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
        return self.confusion.sum(0)

    def metrics(self, slice_index: int | None = None) -> dict[str, object]:
        """Overlap metrics of the whole image, or of one slice along axis 0."""
        cm = self.totals() if slice_index is None else self.confusion[slice_index]
        return overlap_metrics(confusion=cm, ids=self.ids)

    def slice_dice(self) -> NDArray[np.float64]:
        """Macro foreground Dice per slice (1.0 where a slice has no foreground at all)."""
        return macro_dice(self.confusion)
