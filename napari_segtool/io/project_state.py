"""What the user made for one image: labels, the model's last output, painted voxels, versions.

:class:`ProjectState` is what :class:`~napari_segtool.io.project.Project` saves and loads;
see :mod:`napari_segtool.io.project` for the file. Its arrays are in memory; for an image
larger than memory the project holds a
:class:`~napari_segtool.io.chunked_state.ChunkedState` instead, with the same attributes and
the same box-wise methods (:meth:`ProjectState.labelled_region`,
:meth:`ProjectState.labelled_boxes`, :meth:`ProjectState.unlabelled_boxes`), so code written
box by box serves both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.chunked_state import (
    DEFAULT_CHUNKS,
    Box,
    ChunkedState,
    grid_boxes,
    normalise_box,
)
from napari_segtool.io.labelled import Patch, as_patches, labelled_in_box, labelled_mask
from napari_segtool.io.paint import paint_changes

__all__ = ["ProjectState", "merge_untouched"]


@dataclass
class ProjectState:
    """Everything the user made for one image.

    Attributes
    ----------
    labels : ndarray
        The current (corrected) label image.
    machine : ndarray
        What the model last wrote; where ``labels`` differs from it the user changed a voxel.
    painted : bool ndarray
        Voxels the user painted (even if painted back to the machine's value).
    reviewed : set of int
        Slices (Z indices; 0 for a 2D image) the user marked as reviewed: they count whole.
    reviewed_patches : set of (z, y0, y1, x0, x1)
        Patches within a slice (or tiles of a 2D image, z 0) marked reviewed: they count
        whole (:data:`~napari_segtool.io.labelled.Patch`).
    versions : list of dict
        One entry per fine-tuning round: ``version``, ``file`` (relative to the project),
        validation figures, ``promoted`` and what it was trained on.
    current_version : int or None
        The version in use (None: the starting model, named in ``base_model``).
    base_model : str
        The model the project started from: a bundled name, a path inside the project or an
        absolute path (see the module docstring).
    image : dict
        Where the image came from and its shape, to recognise it on reopening.
    """

    labels: NDArray
    machine: NDArray
    painted: NDArray[np.bool_]
    reviewed: set[int] = field(default_factory=set)
    reviewed_patches: set[Patch] = field(default_factory=set)
    versions: list[dict[str, Any]] = field(default_factory=list)
    current_version: int | None = None
    base_model: str = ""
    image: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, prediction: NDArray, *, base_model: str = "", image: dict | None = None):
        """A fresh state from a machine prediction nobody has touched yet."""
        pred = np.asarray(prediction)
        return cls(
            labels=pred.copy(),
            machine=pred.copy(),
            painted=np.zeros(pred.shape, bool),
            base_model=base_model,
            image=dict(image or {"shape": list(pred.shape)}),
        )

    def __post_init__(self) -> None:
        shapes = {self.labels.shape, self.machine.shape, self.painted.shape}
        if len(shapes) != 1:
            raise InputError(f"labels, machine and painted masks differ in shape: {shapes}")
        self.reviewed = {int(z) for z in self.reviewed}
        self.reviewed_patches = as_patches(self.reviewed_patches)

    def changed(self) -> NDArray[np.bool_]:
        """Voxels the user painted or whose label differs from what the model wrote."""
        return self.painted | (self.labels != self.machine)

    def labelled(self) -> NDArray[np.bool_]:
        """The labelled voxels: changed, painted, or in a reviewed slice.

        The one definition (:func:`~napari_segtool.io.labelled.labelled_mask`): these train
        the model and a re-segmentation leaves them alone.

        Raises
        ------
        InputError
            For a reviewed slice outside the image.
        """
        return labelled_mask(self.labels.shape, changed=self.changed(), reviewed=self.reviewed,
                             patches=self.reviewed_patches)  # fmt: skip

    def protected(self) -> NDArray[np.bool_]:
        """Voxels a re-segmentation must not touch: the :meth:`labelled` ones."""
        return self.labelled()

    def mark_painted(self, atoms: Any) -> int:
        """Record the voxels of napari paint-history atoms as painted; returns how many.

        Atoms are ``(indices, old_values, new_value)`` tuples or objects with ``slice_key``
        and ``mask`` (None: the whole box), as ``Labels.events.paint`` sends them.

        >>> s = ProjectState.start(np.zeros((4, 4), np.uint8))
        >>> s.mark_painted([((np.array([0, 1]), np.array([2, 2])), np.zeros(2), 1)])
        2
        """
        n = 0
        for change in paint_changes(atoms):
            change.mark(self.painted)
            n += change.size
        return n

    def snapshot(self) -> ProjectState:
        """An independent copy (to save in a worker while the user keeps painting)."""
        return ProjectState(
            labels=self.labels.copy(),
            machine=self.machine.copy(),
            painted=self.painted.copy(),
            reviewed=set(self.reviewed),
            reviewed_patches=set(self.reviewed_patches),
            versions=[dict(v) for v in self.versions],
            current_version=self.current_version,
            base_model=self.base_model,
            image=dict(self.image),
        )

    def version(self, number: int) -> dict[str, Any]:
        for entry in self.versions:
            if entry["version"] == number:
                return entry
        raise InputError(f"no model version {number} in this project")

    # -- box by box, as ChunkedState ----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    def changed_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """:meth:`changed` over one box (``slice(start, stop)`` per axis)."""
        box = normalise_box(box, self.shape)
        return np.asarray(self.painted[box], bool) | (self.labels[box] != self.machine[box])

    def labelled_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """:meth:`labelled` over one box, as
        :meth:`~napari_segtool.io.chunked_state.ChunkedState.labelled_region`."""
        box = normalise_box(box, self.shape)
        return labelled_in_box(
            self.shape,
            box,
            changed=self.changed_region(box),
            reviewed=self.reviewed,
            patches=self.reviewed_patches,
        )

    def protected_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """:meth:`protected` over one box."""
        return self.labelled_region(box)

    def boxes(self, block: Sequence[int] | None = None) -> Iterator[Box]:
        """The cells of a ``block`` grid over the image (default
        :data:`~napari_segtool.io.chunked_state.DEFAULT_CHUNKS`)."""
        return grid_boxes(self.shape, self._block(block))

    def labelled_boxes(self, block: Sequence[int] | None = None) -> list[Box]:
        """The cells of a ``block`` grid holding a labelled voxel (the image is in memory,
        so this is exact)."""
        labelled = self.labelled()
        return [b for b in self.boxes(block) if labelled[b].any()]

    def unlabelled_boxes(self, block: Sequence[int] | None = None) -> Iterator[Box]:
        """The cells of a ``block`` grid holding a voxel that is not labelled."""
        labelled = self.labelled()
        return (b for b in self.boxes(block) if not labelled[b].all())

    def painted_voxels(self) -> int:
        return int(np.count_nonzero(self.painted))

    def labelled_voxels(self) -> int:
        return int(np.count_nonzero(self.labelled()))

    def _block(self, block: Sequence[int] | None) -> tuple[int, ...]:
        if block is None:
            default = DEFAULT_CHUNKS.get(len(self.shape), self.shape)
            return tuple(min(b, s) for b, s in zip(default, self.shape, strict=True))
        block = tuple(int(b) for b in block)
        if len(block) != len(self.shape) or min(block) < 1:
            raise InputError(f"block {block} is not one positive size per axis of {self.shape}")
        return block


def merge_untouched(state: ProjectState | ChunkedState, prediction: NDArray) -> int:
    """Write a new machine prediction into ``state`` wherever the user has not worked.

    Voxels the user changed or painted and whole reviewed slices keep their labels; elsewhere
    ``labels`` and ``machine`` take the new prediction. Returns the number of voxels whose
    label changed. A :class:`~napari_segtool.io.chunked_state.ChunkedState` is merged box by
    box (:meth:`~napari_segtool.io.chunked_state.ChunkedState.merge_untouched`, which also
    takes ``prediction(box)`` callables); the result is the same.

    Examples
    --------
    >>> s = ProjectState.start(np.zeros((2, 2, 2), np.uint8))
    >>> s.labels[0, 0, 0] = 2                        # a correction
    >>> s.reviewed.add(1)                             # slice 1 reviewed as it was
    >>> merge_untouched(s, np.ones((2, 2, 2), np.uint8)), s.labels.tolist()
    (3, [[[2, 1], [1, 1]], [[0, 0], [0, 0]]])
    """
    if isinstance(state, ChunkedState):
        return state.merge_untouched(prediction)
    pred = np.asarray(prediction)
    if pred.shape != state.labels.shape:
        raise InputError(
            f"the new prediction {pred.shape} does not match the labels {state.labels.shape}"
        )
    free = ~state.protected()
    changed = int(np.count_nonzero(free & (state.labels != pred)))
    state.labels[free] = pred[free]
    state.machine[free] = pred[free]
    return changed
