"""Small Qt layout helpers shared by the docks."""

from __future__ import annotations

from magicgui.widgets import Label
from qtpy.QtWidgets import QSizePolicy, QTableWidget, QTableWidgetItem


def fixed_width(label: Label) -> None:
    """Text updates must not resize the dock (and with it the canvas, an expensive redraw)."""
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.native.setMinimumWidth(10)


def set_cell(table: QTableWidget, row: int, column: int, text: str) -> None:
    """Show ``text`` in a cell, reusing its item and doing nothing when it is unchanged.

    A new item per update makes Qt relayout and repaint the cell every time; on a paint
    event most cells keep their text.
    """
    item = table.item(row, column)
    if item is None:
        table.setItem(row, column, QTableWidgetItem(text))
    elif item.text() != text:
        item.setText(text)
