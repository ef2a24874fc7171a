"""Project folders without the GUI: create one from label files, describe one as plain data."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.project import ChunkedState, Project, ProjectState
from napari_segtool.model import list_models

#: The figures of a version that :func:`describe_project` lists.
VERSION_KEYS = ("version", "file", "promoted", "val_dice", "baseline_dice", "parent", "epochs",
                "labelled_voxels", "painted_voxels", "validation_voxels", "seconds",
                "created")  # fmt: skip


def starting_model(name_or_file: str | os.PathLike[str]) -> str:
    """The ``base_model`` value for a bundled model name or a model file.

    A bundled name stays a name; a file becomes its absolute path (a project may start from
    a model outside its folder).

    Raises
    ------
    InputError
        For a value that is neither.

    Examples
    --------
    >>> starting_model("new-2d")
    'new-2d'
    """
    text = os.fspath(name_or_file)
    names = [e.name for e in list_models()]
    if text in names:
        return text
    path = Path(text).expanduser()
    if path.is_file():
        return str(path.resolve())
    raise InputError(
        f"model {text!r} is neither a bundled model ({', '.join(names)}) nor a model file"
    )


def create_project(
    project: Project,
    *,
    labels: NDArray,
    image_shape: tuple[int, ...],
    painted: NDArray | None = None,
    reviewed: Iterable[int] = (),
    base_model: str = "new-2d",
    image: dict[str, Any] | None = None,
) -> ProjectState:
    """Start a project from corrected labels, as the Fine-tune widget would, and save it.

    Parameters
    ----------
    project : Project
        Its folder must not hold a project yet.
    labels : ndarray of int
        The corrected labels, ``(Y, X)`` or ``(Z, Y, X)``; they also stand for the model's
        last prediction, so only ``painted`` voxels and ``reviewed`` slices count as labelled.
    image_shape : tuple of int
        The image's shape (spatial, plus channels last for RGB); must start with
        ``labels.shape``.
    painted : bool ndarray, optional
        Voxels that count as painted (nonzero: painted).
    reviewed : iterable of int
        Slices (Z) marked reviewed; ``0`` for a 2D image.
    base_model : str
        The starting model (:func:`starting_model`).
    image : dict, optional
        Where the image is: ``name`` and ``path`` (the ``finetune`` command reads ``path``).

    Returns
    -------
    ProjectState
        The state saved.

    Raises
    ------
    InputError
        For a folder that already holds a project, labels that are not integers, shapes that
        disagree, or reviewed slices outside the image.
    """
    if project.exists():
        raise InputError(
            f"{project.folder} already holds a project; choose another folder, or run "
            f"`napari-segtool project {project.folder}` to see it"
        )
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu" or labels.ndim not in (2, 3):
        raise InputError(
            f"labels must be a 2D or 3D integer image, not {labels.ndim}D {labels.dtype}"
        )
    if tuple(image_shape[: labels.ndim]) != labels.shape:
        raise InputError(
            f"the labels {labels.shape} do not match the image {tuple(image_shape)}; give the "
            "labels of this image"
        )
    mask = np.zeros(labels.shape, bool) if painted is None else np.asarray(painted) != 0
    if mask.shape != labels.shape:
        raise InputError(f"the mask {mask.shape} does not match the labels {labels.shape}")
    state = ProjectState(
        labels=labels.copy(),
        machine=labels.copy(),
        painted=mask,
        reviewed=set(reviewed),
        base_model=base_model,
        image={**(image or {}), "shape": list(labels.shape)},
    )
    state.protected()  # reviewed slices outside the image fail here, naming them
    project.save(state)
    return state


def describe_project(project: Project) -> dict[str, Any]:
    """A project as plain JSON values: versions with their Dice, labelled voxels, reviewed.

    Reads the state without taking the project's lock (a project open in napari can be
    described); a chunked project's voxels are counted box by box.
    """
    state = project.load()
    versions = [{k: entry[k] for k in VERSION_KEYS if k in entry} for entry in state.versions]
    return {
        "folder": str(project.folder),
        "image": state.image,
        "shape": list(state.labels.shape),
        "storage": "chunked" if isinstance(state, ChunkedState) else "npz",
        "base_model": state.base_model,
        "current_version": state.current_version,
        "versions": versions,
        "labelled_voxels": state.labelled_voxels(),  # box by box for a chunked project
        "painted_voxels": state.painted_voxels(),
        "reviewed": sorted(state.reviewed),
    }
