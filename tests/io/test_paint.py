"""The one paint-event adapter, fed by real napari Labels layers (brush, fill, polygon)."""

import numpy as np
import pytest
from napari.layers import Labels

from napari_segtool.io.labelled import labelled_mask
from napari_segtool.io.paint import PaintChange, paint_changes
from napari_segtool.io.project import ProjectState
from napari_segtool.metrics import ConfusionTracker, slice_confusion


def _edit(layer, op, rng, shape):
    point = [int(rng.integers(s)) for s in shape]
    layer.selected_label = int(rng.integers(0, 3))
    if op == "brush":
        layer.brush_size = int(rng.integers(1, 9))
        layer.paint(point, layer.selected_label)
    elif op == "fill":
        layer.fill(point, layer.selected_label)
    else:
        y, x = point[-2:]
        lead = point[:1] if len(shape) == 3 else []
        poly = [[*lead, y, x], [*lead, y, x + 5], [*lead, y + 5, x + 5]]
        layer.paint_polygon(poly, layer.selected_label)


@pytest.mark.parametrize("shape", [(30, 40), (5, 24, 28)])
@pytest.mark.parametrize("op", ["brush", "fill", "polygon"])
def test_every_consumer_reads_napari_atoms_alike(shape, op):
    rng = np.random.default_rng(4)
    layer = Labels((rng.random(shape) < 0.4).astype(np.uint8))
    reference = (rng.random(shape) < 0.4).astype(np.uint8)
    state = ProjectState.start(layer.data)
    tracker = ConfusionTracker(layer.data, reference)
    changes: list[PaintChange] = []
    layer.events.paint.connect(lambda e: changes.extend(paint_changes(e.value)))
    layer.events.paint.connect(lambda e: state.mark_painted(e.value))
    layer.events.paint.connect(lambda e: tracker.apply_atoms(e.value, which="pred"))
    for _ in range(12):
        before = layer.data.copy()
        _edit(layer, op, rng, shape)
        changed = layer.data != before
        touched = np.zeros(shape, bool)
        for change in changes:
            change.mark(touched)
        assert not (changed & ~touched).any()  # every change is in an atom
        old = np.concatenate([np.asarray(c.old_values).reshape(-1) for c in changes] or [[]])
        assert sum(c.size for c in changes) == old.size
        if len(shape) == 3:
            planes = set().union(*(c.planes(shape[0]) for c in changes)) if changes else set()
            assert set(np.flatnonzero(changed.any(axis=(1, 2)))) <= planes
        changes.clear()
    recount = slice_confusion(layer.data, reference, ids=tracker.ids)
    np.testing.assert_array_equal(tracker.confusion, recount)
    assert state.painted.any()


def test_index_and_box_atoms():
    index_atom = ((np.array([0, 1]), np.array([2, 2])), np.zeros(2, np.uint8), 1)

    class Box:  # napari's named-tuple atom, read by its fields
        slice_key = (slice(1, 3), slice(0, 2))
        mask = np.array([[True, False], [True, True]])
        old_values = np.zeros(3, np.uint8)
        new_value = 2

    first, second = paint_changes([index_atom, Box()])
    target = np.zeros((4, 4), bool)
    first.mark(target)
    assert target.sum() == 2
    assert first.planes(4) == {0, 1}
    target[:] = False
    second.mark(target)
    assert target[1:3, 0:2].tolist() == [[True, False], [True, True]]
    assert second.size == 3
    assert second.planes(4) == {1, 2}


def test_labelled_voxels_have_one_definition():
    state = ProjectState.start(np.zeros((3, 4, 4), np.uint8))
    state.labels[0, 1, 1] = 2  # changed
    state.painted[1, 0, 0] = True  # painted back to the same value
    state.reviewed = {2}
    expected = np.zeros((3, 4, 4), bool)
    expected[0, 1, 1] = expected[1, 0, 0] = True
    expected[2] = True
    np.testing.assert_array_equal(state.labelled(), expected)
    np.testing.assert_array_equal(state.protected(), expected)
    np.testing.assert_array_equal(
        labelled_mask((3, 4, 4), changed=state.changed(), reviewed={2}), expected
    )
    assert labelled_mask((4, 4), reviewed=[0]).all()
