"""The project half of the Fine-tune dock: one labels layer, its project folder and lock.

:class:`ProjectSession` attaches a project to a labels layer (restoring or starting it),
holds the project's lock while attached, records paint events and reviewed slices and patches
(a patch is the one the Queue widget last zoomed to), saves on a
timer, when the layer is closed, when the widget closes, when the app quits and at interpreter
exit, and gives back the key binding it set. :class:`~napari_segtool._widgets.finetune.
FinetuneWidget` adds the training on top.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from pathlib import Path
from typing import Any

import napari
import napari.layers
from magicgui.widgets import Container, FileEdit, Label, PushButton, create_widget
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_segtool._widgets.queue import (
    FOCUS_KEY,
    REVIEWED_KEY,
    REVIEWED_PATCHES_KEY,
    reviewed_changed,
)
from napari_segtool.errors import SegtoolError
from napari_segtool.io.labelled import patch_problem
from napari_segtool.io.project import Project, ProjectState, default_project_dir

logger = logging.getLogger(__name__)

AUTOSAVE_MS = 60_000
REVIEW_KEY = "Shift-R"


class ProjectSession(Container):
    """A dock that keeps one project attached to one labels layer (see the module docstring).

    Subclasses lay out the controls, call :meth:`_start_session` once, and provide
    :meth:`_error` (a notification), :meth:`cancel` and :meth:`_show_versions`.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._labels = create_widget(annotation="napari.layers.Labels", label="corrected")
        self._folder = FileEdit(label="project folder", mode="d")
        self._open = PushButton(text="Open / start project")
        self._reviewed = Label(label="reviewed", value="-")
        self._mark = PushButton(text=f"Mark slice reviewed ({REVIEW_KEY})")
        self._mark_patch = PushButton(text="Mark patch reviewed")
        self._mark_patch.tooltip = (
            "Marks the patch (or tile) the Queue last zoomed to as reviewed: all its voxels "
            "count as corrected, train the model and are never re-segmented"
        )
        self._status = Label(label="", value="")
        self.project: Project | None = None
        self.state: ProjectState | None = None
        self._layer: napari.layers.Labels | None = None
        self._side_workers: list[Any] = []
        self._dirty = False
        self._closed = False

    # -- hooks --------------------------------------------------------------------------------
    def _error(self, text: str) -> None:
        raise NotImplementedError

    def cancel(self, *_: Any) -> None:
        """Stop the subclass's running job (nothing here)."""

    def _show_versions(self, state: ProjectState) -> None:
        """Show the project's versions (nothing here)."""

    def open_project(self, *_: Any) -> bool:
        raise NotImplementedError

    # -- setup --------------------------------------------------------------------------------
    def _start_session(self) -> None:
        """Connect signals, the shortcut, the autosave timer and the final saves."""
        self._open.changed.connect(self.open_project)
        self._mark.changed.connect(self.toggle_reviewed)
        self._mark_patch.changed.connect(self.toggle_patch)
        self._image.changed.connect(self._suggest_folder)
        self._labels.changed.connect(self._on_pick)
        self._suggest_folder()
        self._key_handler = self._key_reviewed  # one object, to recognise it when unbinding
        self._key_before = self._viewer.bind_key(REVIEW_KEY, self._key_handler, overwrite=True)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._timer = QTimer(self.native)  # parented: deleted with the widget, never after
        self._timer.setInterval(AUTOSAVE_MS)
        self._timer.timeout.connect(self.autosave)
        self._timer.start()
        self.native.destroyed.connect(self._teardown)
        # a script or session that ends without closing the widget still saves the last edits
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._final_save)
        atexit.register(_save_at_exit, weakref.ref(self))

    def _suggest_folder(self, *_: Any) -> None:
        layer = self._image.value
        path = getattr(getattr(layer, "source", None), "path", None)
        if path:
            self._folder.value = default_project_dir(path)
        elif layer is not None:
            self._folder.value = Path.home() / "segtool-projects" / f"{layer.name}.segtool"

    def _on_pick(self, *_: Any) -> None:
        """Picking a layer only says what Open would do; it never writes into a layer.

        (Restoring on a picker change once wrote a project's corrections into the reference
        layer when the prediction was closed and the picker moved by itself.)
        """
        layer = self._labels.value
        if layer is None or layer is self._layer:
            return
        folder = str(self._folder.value)
        attached = f" (the open project stays on '{self._layer.name}')" if self._layer else ""
        if folder not in ("", ".") and Project(folder).exists():
            self._status.value = f"saved project found: Open restores it{attached}"
        elif attached:
            self._status.value = f"Open starts a project on '{layer.name}'{attached}"

    def _session_project(self, folder: Path, *, program: str) -> Project:
        """The open project when ``folder`` is its folder, else a new one for it."""
        if self.project is not None and _same_folder(self.project.folder, folder):
            return self.project
        return Project(folder, program=program)

    # -- attaching ----------------------------------------------------------------------------
    def _attach(self, project: Project, state: ProjectState, layer: napari.layers.Labels):
        self._detach()
        if self.project is not None and self.project is not project:
            self.project.unlock()
        self.project, self.state, self._layer = project, state, layer
        layer.events.paint.connect(self._on_paint)
        self._refresh()

    def _detach(self) -> None:
        if self._layer is not None:
            self._layer.events.paint.disconnect(self._on_paint)
        self._layer = None

    def _on_layer_removed(self, event: Any) -> None:
        """The corrected layer was closed: save what it held and let go of it."""
        if self._layer is None or event.value is not self._layer:
            return
        name = self._layer.name
        try:
            self.save_now()
        except (OSError, SegtoolError) as exc:
            self._error(f"could not save the project of '{name}': {exc}")
        self.cancel()
        self._detach()
        if self.project is not None:
            self.project.unlock()
        self.project = self.state = None
        self._status.value = f"'{name}' closed; its project is saved"

    def _on_paint(self, event: Any) -> None:
        if self.state is not None:
            self.state.mark_painted(event.value)
            self._dirty = True

    def toggle_reviewed(self, *_: Any) -> None:
        """Mark the current slice reviewed (or unmark it)."""
        if self.state is None and not self.open_project():
            return
        assert self.state is not None
        z = int(self._viewer.dims.current_step[0]) if self.state.labels.ndim == 3 else 0
        self.state.reviewed ^= {z}
        self._dirty = True
        self._refresh()

    def toggle_patch(self, *_: Any, box: tuple[int, ...] | None = None) -> bool:
        """Mark the patch ``box`` ``(z, y0, y1, x0, x1)`` reviewed (or unmark it); by default
        the patch or tile the Queue widget last zoomed to. Returns whether one was toggled."""
        if self.state is None and not self.open_project():
            return False
        assert self.state is not None
        from_queue = box is None
        if box is None:
            layer = self._layer
            box = None if layer is None else layer.metadata.get(FOCUS_KEY)
        if box is None:
            self._error("click a patch in the Queue (units: patches) first, then mark it")
            return False
        patch = tuple(int(v) for v in box)
        here = int(self._viewer.dims.current_step[0]) if self.state.labels.ndim == 3 else 0
        if from_queue and patch[0] != here:
            self._error(f"the patch the Queue showed is on slice {patch[0]}, this is slice "
                        f"{here}: click a patch of this slice in the Queue")  # fmt: skip
            return False
        problem = patch_problem([patch], tuple(self.state.shape))
        if problem:
            self._error(problem)
            return False
        self.state.reviewed_patches ^= {patch}  # type: ignore[arg-type]
        self._dirty = True
        self._refresh()
        return True

    def _key_reviewed(self, _viewer: Any) -> None:
        self.toggle_reviewed()

    def _refresh(self) -> None:
        state = self.state
        if state is None:
            return
        if self._layer is not None:  # the Queue widget leaves reviewed slices and patches out
            slices, patches = set(state.reviewed), set(state.reviewed_patches)
            meta = self._layer.metadata
            if meta.get(REVIEWED_KEY) != slices or meta.get(REVIEWED_PATCHES_KEY) != patches:
                meta[REVIEWED_KEY], meta[REVIEWED_PATCHES_KEY] = slices, patches
                reviewed_changed(self._layer)
        reviewed = sorted(state.reviewed)
        shown = ", ".join(map(str, reviewed[:12])) + (" ..." if len(reviewed) > 12 else "")
        parts = [f"{len(reviewed)} slices: {shown}"] if reviewed else []
        if state.reviewed_patches:
            n = len(state.reviewed_patches)
            parts.append(f"{n} patch{'es' * (n != 1)}")
        self._reviewed.value = "; ".join(parts) or "none"
        self._show_versions(state)

    # -- saving -------------------------------------------------------------------------------
    def autosave(self) -> None:
        """Save in a worker when something changed (called by the timer)."""
        if self.project is None or self.state is None or not self._dirty:
            return
        self._dirty = False
        snapshot = self.state.snapshot()
        worker = create_worker(self.project.save, snapshot,
                               _connect={"errored": self._on_save_error})  # fmt: skip
        self._side_workers.append(worker)

    def save_now(self) -> None:
        """Save on this thread (used when closing)."""
        if self.project is not None and self.state is not None:
            self.project.save(self.state.snapshot())
            self._dirty = False

    def _on_save_error(self, exc: Exception) -> None:
        self._dirty = True
        self._error(f"could not save the project: {exc}")

    def _final_save(self) -> None:
        """Save on close, on quit and at interpreter exit; never raises."""
        try:
            if self._dirty:
                self.save_now()
        except (OSError, SegtoolError) as exc:  # closing must not raise
            logger.error("could not save the project on close: %s", exc)

    # -- closing ------------------------------------------------------------------------------
    def _teardown(self, *_: Any) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the Qt side may be gone already
            self._timer.stop()
        self._unbind_key()
        self.cancel()
        for worker in self._side_workers:
            worker.quit()
        self._final_save()
        if self.project is not None:
            self.project.unlock()

    def _unbind_key(self) -> None:
        """Give the shortcut back to what it did before, unless another widget took it since."""
        bound = self._viewer.bind_key(REVIEW_KEY, None)
        if bound is not None and bound is not self._key_handler:  # another widget's: keep it
            self._viewer.bind_key(REVIEW_KEY, bound)
        elif self._key_before is not None:
            self._viewer.bind_key(REVIEW_KEY, self._key_before)


def _same_folder(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _save_at_exit(ref: weakref.ref) -> None:
    widget = ref()
    if widget is not None:
        widget._final_save()
