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
from napari_segtool.io.project import Project, ProjectState
from napari_segtool.model.bundled import load_model
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.finetune import FinetuneResult, LabelledImage, labelled_mask

logger = logging.getLogger(__name__)


def training_data(image: NDArray, state: ProjectState) -> LabelledImage:
    """The image with the project's labels, counting only what the user changed or reviewed."""
    changed = state.painted | (state.labels != state.machine)
    mask = labelled_mask(state.labels.shape, changed=changed, reviewed=state.reviewed)
    return LabelledImage(np.asarray(image), state.labels, mask)


def current_model(project: Project, state: ProjectState) -> SegmentationModel:
    """The model in use: the current version, or the model the project started from."""
    if state.current_version is None:
        if not state.base_model:
            raise InputError("this project names no starting model")
        return load_model(state.base_model)
    return SegmentationModel.load(project.folder / state.version(state.current_version)["file"])


def record_round(
    project: Project,
    state: ProjectState,
    result: FinetuneResult,
    *,
    accept_worse: bool = False,
) -> dict[str, Any]:
    """Save a finished round as a new version, promote it if it is not worse, save the project.

    The model file is written (atomically) before the project state that names it.
    Returns the new version's entry.
    """
    version = project.next_version(state)
    path = project.model_path(version)
    model = result.model
    base = state.base_model or model.name
    model.name = f"{base} v{version}"
    model.save(path)
    promoted = bool(result.promote or accept_worse)
    entry = {
        "version": version,
        "file": path.relative_to(project.folder).as_posix(),
        "parent": state.current_version,
        "baseline_dice": result.baseline_dice,
        "val_dice": result.best_dice,
        "promoted": promoted,
        "epochs": result.epochs,
        "labelled_voxels": result.labelled_voxels,
        "validation_voxels": result.validation_voxels,
        "reviewed": sorted(state.reviewed),
        "seconds": round(result.seconds, 2),
        "created": _dt.datetime.now(_dt.UTC).isoformat(),
    }
    state.versions.append(entry)
    if promoted:
        state.current_version = version
    else:
        logger.info(
            "version %d not promoted: validation Dice %s < %s of the model it started from",
            version,
            result.best_dice,
            result.baseline_dice,
        )
    project.save(state)
    return entry


def switch_version(project: Project, state: ProjectState, version: int | None) -> None:
    """Use ``version`` (None: the starting model) from now on, and save the project."""
    if version is not None:
        entry = state.version(version)
        if not (project.folder / entry["file"]).exists():
            raise InputError(f"model file of version {version} is missing: {entry['file']}")
    state.current_version = version
    project.save(state)
