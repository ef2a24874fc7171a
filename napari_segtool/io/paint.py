"""The one reader of napari paint events: history atoms to (indices or box, old, new).

``Labels.events.paint`` sends a list of history atoms in ``event.value``. napari writes two
kinds: a tuple ``(indices, old_values, new_value)`` with ``indices`` a tuple of index arrays
(brush dabs, older napari), and a named tuple with ``slice_key`` (a tuple of slices, the box
changed), ``mask`` (a bool array over the box, or None for all of it), ``old_values`` (the
old values under the mask, in C order) and ``new_value`` (fills, newer napari).
:func:`paint_changes` turns either into a :class:`PaintChange`; every consumer (the
confusion tracker, the project's record of painted voxels, the Review widget) reads those.

It sits in ``io`` because ``io`` is the lowest layer that the metrics, the project files and
the widgets may all import; it needs numpy only (no napari: atoms are read by their shape).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["PaintChange", "paint_changes"]


@dataclass(frozen=True)
class PaintChange:
    """Voxels of one paint atom that changed from ``old_values`` to ``new_value``.

    Exactly one of ``indices`` and ``box`` is set.

    Attributes
    ----------
    indices : tuple of ndarray or None
        One index array per axis (the voxels changed).
    box : tuple of slice or None
        The box changed; with ``mask``, only the voxels of the box where ``mask`` is True.
    mask : bool ndarray or None
        Over ``box``; None means the whole box.
    old_values : ndarray
        The old value of each changed voxel (C order over the box).
    new_value : scalar or ndarray
        The value painted.
    """

    indices: tuple[NDArray[np.intp], ...] | None
    box: tuple[slice, ...] | None
    mask: NDArray[np.bool_] | None
    old_values: NDArray
    new_value: Any

    @property
    def size(self) -> int:
        """Number of voxels changed (the number of old values)."""
        return int(np.asarray(self.old_values).size)

    def mark(self, target: NDArray[np.bool_]) -> None:
        """Set the changed voxels of ``target`` (a bool mask of the image's shape) to True."""
        if self.indices is not None:
            target[self.indices] = True
        elif self.mask is None:
            target[self.box] = True
        else:
            target[self.box] |= self.mask

    def planes(self, depth: int) -> set[int]:
        """Indices along axis 0 (Z of a stack with ``depth`` slices) that the atom touches."""
        if self.indices is not None:
            return {int(z) for z in np.unique(self.indices[0])}
        assert self.box is not None
        return set(range(*self.box[0].indices(depth)))


def paint_changes(atoms: Iterable[Any]) -> Iterator[PaintChange]:
    """Read napari paint-history atoms (the ``value`` of a ``Labels.events.paint`` event).

    Examples
    --------
    >>> atom = ((np.array([0, 1]), np.array([2, 2])), np.zeros(2), 1)
    >>> [(c.size, sorted(c.planes(4))) for c in paint_changes([atom])]
    [(2, [0, 1])]
    """
    for atom in atoms:
        if hasattr(atom, "slice_key"):  # a named tuple, so test this first
            mask = None if atom.mask is None else np.asarray(atom.mask, bool)
            yield PaintChange(None, tuple(atom.slice_key), mask, atom.old_values, atom.new_value)
        else:
            indices, old_values, new_value = atom
            idx = tuple(np.asarray(i) for i in indices)
            yield PaintChange(idx, None, None, old_values, new_value)
