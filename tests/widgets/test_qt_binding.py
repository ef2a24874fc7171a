"""The widget tests run on the Qt binding they were asked to run on, and on that one only.

CI runs ``tests/widgets`` twice, in two environments: PyQt5 (``.[test,pyqt5]``) and PyQt6
(``.[test,pyqt6]`` with ``QT_API=pyqt6``). One binding per environment, as napari asks: with
two, qtpy (PyQt5 first) and pytest-qt (PyQt6 first) would each pick a different one.
"""

import importlib.metadata

import qtpy
from pytestqt.qt_compat import qt_api
from qtpy.QtWidgets import QApplication

BINDINGS = ("PyQt5", "PyQt6", "PySide2", "PySide6")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_one_qt_binding_is_installed_and_everything_uses_it(qapp):
    installed = [name for name in BINDINGS if _installed(name)]
    assert installed == [qtpy.API_NAME], f"one Qt binding per environment, found {installed}"
    if qtpy.binding_specified:  # QT_API=pyqt6 (CI's second run) must not fall back silently
        assert qtpy.initial_api == qtpy.API  # as asked
    assert qt_api.pytest_qt_api == qtpy.API  # pytest-qt drives the same binding as napari
    assert QApplication.__module__.split(".")[0] == qtpy.API_NAME
    assert isinstance(qapp, QApplication)
