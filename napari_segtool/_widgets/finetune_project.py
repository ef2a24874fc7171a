"""Attaching the Fine-tune widget's project to layers: checks, restore, a new state.

A chunked project (an image larger than memory) is attached by handing napari its zarr
``labels`` array as the layer's data, so painting writes through to the store: nothing of
the volume is copied or compared on the UI thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
import napari.layers
import numpy as np
from napari.utils.notifications import show_info

from napari_segtool._widgets.roles import role
from napari_segtool._widgets.segment import ORIGINAL_KEY, SOURCE_KEY
from napari_segtool.errors import InputError
from napari_segtool.io.chunked_state import MAX_WHOLE_VOXELS
from napari_segtool.io.project import ChunkedState, Project, ProjectState
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
) -> ProjectState | ChunkedState:
    """Load the saved state into ``layer``; what the layer held differently is kept beside.

    A chunked project's ``labels`` become the layer's data; a layer already showing that
    store is taken as it is (nothing is read).
    """
    state = project.load()
    if state.labels.shape != layer.data.shape:
        raise InputError(
            f"{project.state_path}: saved for shape {state.labels.shape}, not "
            f"{layer.data.shape}; choose another project folder"
        )
    if isinstance(state, ChunkedState):
        if not same_store(layer.data, state.labels):
            _keep_beside(viewer, layer, copy=isinstance(layer.data, np.ndarray))
        layer.data = state.labels  # napari paints into the store
        return state
    if not np.array_equal(np.asarray(layer.data), state.labels):
        _keep_beside(viewer, layer, copy=True)  # never lose what is in the layer now
    layer.data = state.labels  # restore the saved corrections
    state.labels = layer.data
    return state


def _keep_beside(viewer: napari.viewer.Viewer, layer: napari.layers.Labels, *, copy: bool):
    """The layer's present content as a hidden layer beside it (a lazy one is not copied)."""
    data = np.array(layer.data, copy=True) if copy else layer.data
    backup = viewer.add_labels(data, name=f"{layer.name} before restore", scale=layer.scale,
                               translate=layer.translate, visible=False)  # fmt: skip
    show_info(f"Fine-tune: the layer's previous content is in '{backup.name}'")


def same_store(data: Any, array: Any) -> bool:
    """Whether the layer data ``data`` is the zarr array ``array`` (the same files)."""
    if data is array:
        return True
    try:
        return str(data.store.root) == str(array.store.root) and data.path == array.path
    except AttributeError:
        return False


def wants_chunks(data: Any) -> bool:
    """Whether a labels layer's data needs a chunked project: lazy, or too big to copy."""
    return not isinstance(data, np.ndarray) or data.size > MAX_WHOLE_VOXELS


def new_state(
    layer: napari.layers.Labels,
    image: napari.layers.Image,
    base: str | None,
    project: Project | None = None,
) -> ProjectState | ChunkedState:
    """A fresh state for ``layer``; ``base`` None: the model that made the prediction.

    With a ``project`` and a layer whose data is lazy or larger than
    :data:`~napari_segtool.io.chunked_state.MAX_WHOLE_VOXELS`, a chunked project is created
    there (its arrays written box by box, saved) and the layer shows its store.
    """
    original = layer.metadata.get(ORIGINAL_KEY)
    if base is None:
        base = layer.metadata.get(SOURCE_KEY) or list_models()[0].name
    record = {"name": image.name, "shape": list(layer.data.shape),
              "path": str(getattr(image.source, "path", "") or "")}  # fmt: skip
    if project is not None and wants_chunks(layer.data):
        machine = original if original is not None and original.shape == layer.data.shape else None
        state = project.create_chunked(labels=layer.data, machine=machine, base_model=str(base),
                                       image=record)  # fmt: skip
        layer.data = state.labels
        return state
    data = np.asarray(layer.data)
    machine = original if isinstance(original, np.ndarray) else data
    return ProjectState(
        labels=data,
        machine=np.array(machine, copy=True),
        painted=np.zeros(data.shape, bool),
        base_model=str(base),
        image=record,
    )
