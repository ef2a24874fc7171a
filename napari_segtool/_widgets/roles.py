"""Layer pickers that start on the right layer: defaults by role, kept right as layers come.

magicgui's layer pickers start on the first layer of the right type, which in a viewer holding
an image, its reference and a prediction is the reference: the wrong layer to correct, and the
raw image as an "uncertainty". :class:`RoleDefault` points a picker at the newest layer with
the wanted role (see :mod:`napari_segtool.layer_roles`) and moves it when such a layer is
added; it never moves a picker away from a layer the user picked by hand otherwise.
"""

from __future__ import annotations

from typing import Any

import napari
import napari.layers

from napari_segtool.layer_roles import PREDICTION, REFERENCE, ROLE_KEY, UNCERTAINTY

VERSION_KEY = "segtool_data_version"  # bumped by the plugin when it rewrites data in place


def role(layer: Any) -> str | None:
    """The role recorded in ``layer``'s metadata, or a guess from a name the plugin gives."""
    if layer is None:
        return None
    meta = getattr(layer, "metadata", None) or {}
    if meta.get(ROLE_KEY):
        return str(meta[ROLE_KEY])
    name = str(getattr(layer, "name", ""))
    for suffix, guess in ((" prediction", PREDICTION), (" uncertainty", UNCERTAINTY),
                          (" reference", REFERENCE)):  # fmt: skip
        if name.endswith(suffix):
            return guess
    return None


def newest_with_role(viewer: napari.viewer.Viewer, kind: type, wanted: str) -> Any:
    """The top-most layer of type ``kind`` whose role is ``wanted`` (None if there is none)."""
    for layer in reversed(list(viewer.layers)):
        if isinstance(layer, kind) and role(layer) == wanted:
            return layer
    return None


class RoleDefault:
    """Keeps one layer picker on a layer with role ``wanted``; call :meth:`apply` after every
    ``reset_choices`` (napari calls that when the widget is docked and on layer events).

    The first time the picker has layers, it moves to the newest layer with the role unless
    it already shows one. Later it moves only when a layer with the role is *added*, so a
    layer the user picked by hand stays picked. A picker left on a layer whose role is in
    ``avoid`` (the reference, say, after the prediction was closed) moves off it: to a layer
    with the role, else to another layer, else to nothing when the picker allows that.
    """

    def __init__(self, picker: Any, kind: type, wanted: str, *, avoid: tuple[str, ...] = ()):
        self.picker = picker
        self.kind = kind
        self.wanted = wanted
        self.avoid = avoid
        self._seen: set[int] | None = None

    def apply(self, viewer: napari.viewer.Viewer) -> None:
        layers = [lyr for lyr in viewer.layers if isinstance(lyr, self.kind)]
        choices = _choices(self.picker)
        if not choices:
            return  # not docked yet: napari has not filled the picker
        with_role = [lyr for lyr in layers if role(lyr) == self.wanted and lyr in choices]
        first = self._seen is None
        fresh = [lyr for lyr in with_role if first or id(lyr) not in (self._seen or set())]
        self._seen = {id(lyr) for lyr in layers}
        current = self.picker.value
        if fresh and (not first or role(current) != self.wanted):
            self.picker.value = fresh[-1]
        elif role(current) in self.avoid:
            others = with_role or [c for c in choices if role(c) not in self.avoid]
            if others:
                self.picker.value = others[-1]
            elif _nullable(self.picker):
                self.picker.value = None


def apply_all(viewer: napari.viewer.Viewer, defaults: Any) -> None:
    """Apply each :class:`RoleDefault` of a widget (from its ``reset_choices``)."""
    for default in defaults or ():
        default.apply(viewer)


def _choices(picker: Any) -> list[Any]:
    return [c for c in getattr(picker, "choices", ()) if c is not None]


def _nullable(picker: Any) -> bool:
    return bool(getattr(picker, "_nullable", False))


def data_version(layer: napari.layers.Labels) -> tuple[int, ...]:
    """A key that changes whenever the layer's data may have changed without a paint event.

    Undo and redo move an item between napari's two history queues; assigning ``layer.data``
    changes the array's identity; the plugin bumps ``metadata[VERSION_KEY]`` when it rewrites
    the array in place. A slice change (which napari also announces as ``set_data``) changes
    none of them.
    """
    undo = getattr(layer, "_undo_history", None)
    redo = getattr(layer, "_redo_history", None)
    if undo is None or redo is None:  # another napari: treat every set_data as a change
        return (id(layer.data), id(object()))
    return (
        id(layer.data),
        int(layer.metadata.get(VERSION_KEY, 0)),
        len(undo),
        len(redo),
        id(undo[-1]) if undo else 0,
        id(redo[-1]) if redo else 0,
    )


def bump_version(layer: napari.layers.Labels) -> None:
    """Say that the plugin rewrote ``layer.data`` in place (before ``layer.data = ...``)."""
    layer.metadata[VERSION_KEY] = int(layer.metadata.get(VERSION_KEY, 0)) + 1
