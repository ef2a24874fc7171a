"""What the user made for one image: labels, the model's last output, painted voxels, versions.

:class:`ProjectState` is what :class:`~napari_segtool.io.project.Project` saves and loads;
see :mod:`napari_segtool.io.project` for the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.labelled import labelled_mask
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
        return labelled_mask(self.labels.shape, changed=self.changed(), reviewed=self.reviewed)

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


def merge_untouched(state: ProjectState, prediction: NDArray) -> int:
    """Write a new machine prediction into ``state`` wherever the user has not worked.

    Voxels the user changed or painted and whole reviewed slices keep their labels; elsewhere
    ``labels`` and ``machine`` take the new prediction. Returns the number of voxels whose
    label changed.

    Examples
    --------
    >>> s = ProjectState.start(np.zeros((2, 2, 2), np.uint8))
    >>> s.labels[0, 0, 0] = 2                        # a correction
    >>> s.reviewed.add(1)                             # slice 1 reviewed as it was
    >>> merge_untouched(s, np.ones((2, 2, 2), np.uint8)), s.labels.tolist()
    (3, [[[2, 1], [1, 1]], [[0, 0], [0, 0]]])
    """
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
