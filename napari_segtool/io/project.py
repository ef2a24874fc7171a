"""Project folders: a user's corrections, reviewed slices and model versions for one image.

Layout of a project folder (by default ``<image file>.segtool/`` beside the image)::

    state.npz          labels, the last machine prediction, the painted-voxel mask, and a
                       JSON record (image, reviewed slices, model versions, current version)
    models/v0001.pt    one model file per fine-tuning round

``state.npz`` is one file written atomically (temporary file, fsync, rename), so the labels,
the record of what the user touched and the list of versions always belong together, and a
crash or kill mid-save leaves the previous save intact. Model files are written (atomically)
before the state that names them. Loading never unpickles (``allow_pickle=False``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_write

FORMAT = "napari-segtool-project"
FORMAT_VERSION = 1
STATE_FILE = "state.npz"
SUFFIX = ".segtool"


def default_project_dir(image_path: str | os.PathLike[str]) -> Path:
    """``<image file>.segtool`` beside the image.

    >>> default_project_dir("/data/stack.tif").as_posix()
    '/data/stack.tif.segtool'
    """
    p = Path(image_path)
    return p.with_name(p.name + SUFFIX)


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
        The model the project started from (bundled name or file path).
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

    def protected(self) -> NDArray[np.bool_]:
        """Voxels a re-segmentation must not touch: changed, painted, or in reviewed slices."""
        mask = self.painted | (self.labels != self.machine)
        for z in self.reviewed:
            if self.labels.ndim == 2:
                mask[...] = True
            else:
                mask[z] = True
        return mask

    def mark_painted(self, atoms: Any) -> int:
        """Record the voxels of napari paint-history atoms as painted; returns how many.

        Atoms are ``(indices, old_values, new_value)`` tuples or objects with ``slice_key``
        and ``mask`` (None: the whole box), as ``Labels.events.paint`` sends them.

        >>> s = ProjectState.start(np.zeros((4, 4), np.uint8))
        >>> s.mark_painted([((np.array([0, 1]), np.array([2, 2])), np.zeros(2), 1)])
        2
        """
        n = 0
        for atom in atoms:
            if hasattr(atom, "slice_key"):
                box = tuple(atom.slice_key)
                if atom.mask is None:
                    self.painted[box] = True
                    n += int(self.painted[box].size)
                else:
                    self.painted[box] |= atom.mask
                    n += int(np.count_nonzero(atom.mask))
            else:
                indices = tuple(np.asarray(i) for i in atom[0])
                self.painted[indices] = True
                n += int(indices[0].size)
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


class Project:
    """A project folder; see the module docstring for its layout."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def model_path(self, version: int) -> Path:
        return self.folder / "models" / f"v{version:04d}.pt"

    def exists(self) -> bool:
        return self.state_path.exists()

    def next_version(self, state: ProjectState) -> int:
        used = [v["version"] for v in state.versions]
        on_disk = [
            int(p.stem[1:]) for p in (self.folder / "models").glob("v*.pt") if p.stem[1:].isdigit()
        ]
        return max([0, *used, *on_disk]) + 1

    def save(self, state: ProjectState) -> Path:
        """Write the state atomically; returns the state file's path."""
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved": _dt.datetime.now(_dt.UTC).isoformat(),
            "reviewed": sorted(state.reviewed),
            "versions": state.versions,
            "current_version": state.current_version,
            "base_model": state.base_model,
            "image": state.image,
            "shape": list(state.labels.shape),
        }
        meta = np.frombuffer(json.dumps(record).encode(), np.uint8)
        # copies first, so painting on the UI thread during the write cannot tear the save
        arrays = {
            "labels": np.array(state.labels, copy=True),
            "machine": np.array(state.machine, copy=True),
            "painted": np.packbits(state.painted, axis=None),
            "meta": meta,
        }
        return atomic_write(self.state_path, lambda fh: np.savez_compressed(fh, **arrays))

    def load(self) -> ProjectState:
        """Read the state back.

        Raises
        ------
        InputError
            Naming the file: missing, damaged, not a project, or from a newer version.
        """
        p = self.state_path
        if not p.exists():
            raise InputError(f"{p}: no project saved here")
        try:
            with np.load(p, allow_pickle=False) as npz:
                record = json.loads(npz["meta"].tobytes().decode())
                labels = npz["labels"]
                machine = npz["machine"]
                bits = npz["painted"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: damaged project file ({exc})") from exc
        if record.get("format") != FORMAT:
            raise InputError(f"{p}: not a napari-segtool project file")
        if int(record.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"{p}: written by a newer napari-segtool; update it to open this")
        painted = np.unpackbits(bits, count=labels.size).astype(bool).reshape(labels.shape)
        return ProjectState(
            labels=labels,
            machine=machine,
            painted=painted,
            reviewed=set(record.get("reviewed", [])),
            versions=list(record.get("versions", [])),
            current_version=record.get("current_version"),
            base_model=record.get("base_model", ""),
            image=record.get("image", {}),
        )


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
