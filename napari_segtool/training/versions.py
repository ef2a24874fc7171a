"""Model versions in a project: one per fine-tuning round, promoted only when not worse.

Each finished round is saved as ``models/vNNNN.pt`` in the project with its validation
figures and what it was trained on. It becomes the current model when its validation Dice is
at least that of the model it started from, measured on the same held-out voxels; otherwise it
is kept but not used unless the user picks it (:func:`switch_version`). A cancelled round
saves nothing, so the current model and its file stay as they were.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.project import ChunkedState, Project, ProjectState
from napari_segtool.model.bundled import list_models, load_model
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.finetune import FinetuneResult, LabelledImage

logger = logging.getLogger(__name__)


def training_data(image: NDArray, state: ProjectState | ChunkedState) -> LabelledImage:
    """The image with the project's labels, counting only what the user changed or reviewed.

    Raises
    ------
    InputError
        For a chunked project, whose volume is never held in memory: it trains box by box
        (:func:`~napari_segtool.training.finetune.iter_finetune_boxes`).
    """
    if isinstance(state, ChunkedState):
        raise InputError(
            "a chunked project is not read whole into memory; train it box by box with "
            "split_labelled_boxes() and iter_finetune_boxes()"
        )
    return LabelledImage(np.asarray(image), state.labels, state.labelled())


def current_model(project: Project, state: ProjectState | ChunkedState) -> SegmentationModel:
    """The model in use: the current version, or the model the project started from.

    A bare ``base_model`` name is a bundled model, or else a file of that name in the project
    folder; paths follow :mod:`napari_segtool.io.project` (inside the folder, or absolute).
    """
    if state.current_version is None:
        if not state.base_model:
            raise InputError("this project names no starting model")
        path = project.base_model_path(state.base_model)
        if path is None:  # a bare name: never looked up in the working directory
            if state.base_model in {e.name for e in list_models()}:
                return load_model(state.base_model)
            path = project.file(state.base_model)
            if not path.is_file():
                raise InputError(
                    f"starting model {state.base_model!r} is neither a bundled model nor a "
                    f"file in {project.folder}; pick a starting model"
                )
        return load_model(path)
    return SegmentationModel.load(project.file(state.version(state.current_version)["file"]))


def record_round(
    project: Project,
    state: ProjectState,
    result: FinetuneResult,
    *,
    accept_worse: bool = False,
    save: bool = True,
) -> dict[str, Any]:
    """Save a finished round as a new version and promote it if it is not worse.

    Under the project's lock (:meth:`Project.add_version`) the next free version number is
    claimed, the model file ``models/vNNNN.pt`` is written (atomically) and the version is
    recorded in ``state.npz``, so two writers never claim one number and never drop each
    other's versions. ``state.versions`` and ``state.current_version`` are updated.

    Parameters
    ----------
    project : Project
    state : ProjectState
        The project state the round trained from.
    result : FinetuneResult
    accept_worse : bool, optional
        Promote the version even when its validation Dice is lower.
    save : bool, optional
        True (default): ``state`` is the user's current state; it is saved whole. False:
        ``state`` is a snapshot from the start of the round; only the new version (and the
        current version) is merged into the state on disk, so corrections saved since the
        snapshot (autosave) are kept. A widget training on a snapshot passes ``save=False``
        and saves its live state afterwards.

    Returns
    -------
    dict
        The new version's entry.

    Raises
    ------
    InputError
        When another writer holds the project for longer than ``project.wait`` seconds.
    """
    model = result.model
    base = state.base_model or model.name
    promoted = bool(result.promote or accept_worse)

    def write(path, version: int) -> None:
        model.name = f"{base} v{version}"
        model.save(path)

    figures = {
        "parent": state.current_version,
        "baseline_dice": result.baseline_dice,
        "val_dice": result.best_dice,
        "promoted": promoted,
        "epochs": result.epochs,
        "labelled_voxels": result.labelled_voxels,
        # the user's effort so far: the project's learning curve plots val Dice against it
        "painted_voxels": state.painted_voxels(),
        "validation_voxels": result.validation_voxels,
        "reviewed": sorted(state.reviewed),
        "seconds": round(result.seconds, 2),
        "created": _dt.datetime.now(_dt.UTC).isoformat(),
    }
    entry = project.add_version(state, write, figures, promote=promoted, save=save)
    if not promoted:
        logger.info(
            "version %d not promoted: validation Dice %s < %s of the model it started from",
            entry["version"],
            result.best_dice,
            result.baseline_dice,
        )
    return entry


def switch_version(project: Project, state: ProjectState, version: int | None) -> None:
    """Use ``version`` (None: the starting model) from now on, and save the project."""
    if version is not None:
        entry = state.version(version)
        if not project.file(entry["file"]).exists():
            raise InputError(f"model file of version {version} is missing: {entry['file']}")
    state.current_version = version
    project.save(state)
