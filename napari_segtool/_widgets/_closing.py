"""One way for a dock widget to learn it was closed, so it can disconnect from the viewer.

napari's close button (and ``viewer.window.remove_dock_widget``) takes the widget out of its
dock (``setParent(None)``) without destroying it, so ``destroyed`` alone comes late or never.
:func:`on_close` calls back once, on whichever comes first: leaving the dock, or being
destroyed.
"""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget


class _CloseWatcher(QObject):
    def __init__(self, widget: QWidget, callback: Callable[[], None]):
        super().__init__(widget)
        self._docked = widget.parent() is not None
        self._callback: Callable[[], None] | None = callback
        widget.installEventFilter(self)
        widget.destroyed.connect(self._fire)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.ParentChange:
            if obj.parent() is not None:
                self._docked = True
            elif self._docked:
                self._fire()
        return False

    def _fire(self, *_: object) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def on_close(widget: QWidget, callback: Callable[[], None]) -> None:
    """Call ``callback`` once when ``widget`` leaves its dock or is destroyed."""
    _CloseWatcher(widget, callback)
