"""Attaching the Fine-tune widget's project to layers: checks, restore, a new state."""

from __future__ import annotations

from pathlib import Path

import napari
import napari.layers
import numpy as np
from napari.utils.notifications import show_info

from napari_segtool._widgets.roles import role
from napari_segtool._widgets.segment import ORIGINAL_KEY, SOURCE_KEY
from napari_segtool.errors import InputError
from napari_segtool.io.project import Project, ProjectState
from napari_segtool.layer_roles import REFERENCE
from napari_segtool.model import list_models


def check_pair(layer: napari.layers.Labels | None, image: napari.layers.Image | None) -> None:
    """Refuse a labels layer Fine-tune may not write into, or one of another image's shape."""
    if layer is None or image is None:
        raise InputError("pick the image and the corrected labels layer first")
    if role(layer) == REFERENCE:
        raise InputError(
            f"'{layer.name}' is a reference layer, which Fine-tune never writes into; "
            "pick the prediction to correct (a reference can train as 'ground truth')"
        )
    spatial = image.data.shape[:-1] if image.rgb else image.data.shape
    if tuple(layer.data.shape) != tuple(spatial):
        raise InputError(
            f"'{layer.name}' has shape {layer.data.shape} but '{image.name}' has "
            f"{tuple(spatial)}; pick the prediction of this image"
        )


def project_folder(value: object) -> Path:
    """The folder the picker holds, refusing an empty one."""
    if not str(value) or str(value) == ".":
        raise InputError("choose a project folder")
    return Path(str(value))


def restore(
    viewer: napari.viewer.Viewer, project: Project, layer: napari.layers.Labels
) -> ProjectState:
    """Load the saved state into ``layer``; what the layer held differently is kept beside."""
    state = project.load()
    if state.labels.shape != layer.data.shape:
        raise InputError(
            f"{project.state_path}: saved for shape {state.labels.shape}, not "
            f"{layer.data.shape}; choose another project folder"
        )
    if not np.array_equal(np.asarray(layer.data), state.labels):
        # never lose what is in the layer now: keep it beside the restored one
        backup = viewer.add_labels(
            np.array(layer.data, copy=True), name=f"{layer.name} before restore",
            scale=layer.scale, translate=layer.translate, visible=False,
        )  # fmt: skip
        show_info(f"Fine-tune: the layer's previous content is in '{backup.name}'")
    layer.data = state.labels  # restore the saved corrections
    state.labels = layer.data
    return state


def new_state(
    layer: napari.layers.Labels, image: napari.layers.Image, base: str | None
) -> ProjectState:
    """A fresh state for ``layer``; ``base`` None: the model that made the prediction."""
    original = layer.metadata.get(ORIGINAL_KEY)
    data = np.asarray(layer.data)
    machine = original if isinstance(original, np.ndarray) else data
    if base is None:
        base = layer.metadata.get(SOURCE_KEY) or list_models()[0].name
    return ProjectState(
        labels=data,
        machine=np.array(machine, copy=True),
        painted=np.zeros(data.shape, bool),
        base_model=str(base),
        image={"name": image.name, "shape": list(data.shape),
               "path": str(getattr(image.source, "path", "") or "")},
    )  # fmt: skip
