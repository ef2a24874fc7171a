import numpy as np
import pytest
from napari.layers import Labels

from napari_segtool.metrics import ConfusionTracker, overlap_metrics, slice_confusion


def connect(tracker, edited, reference):
    edited.events.paint.connect(lambda e: tracker.apply_atoms(e.value, which="pred"))
    reference.events.paint.connect(lambda e: tracker.apply_atoms(e.value, which="ref"))
    for layer in (edited, reference):
        layer.events.set_data.connect(lambda e: tracker.recount(edited.data, reference.data))


def test_slice_confusion_sums_to_whole_image():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (5, 8, 9))
    ref = rng.integers(0, 3, (5, 8, 9))
    per = slice_confusion(pred, ref, 3)
    assert per.shape == (5, 3, 3)
    assert per.sum() == pred.size
    np.testing.assert_array_equal(per[2], slice_confusion(pred[2], ref[2], 3)[0])


def test_index_update_and_new_classes():
    pred = np.zeros((2, 4, 4), np.uint8)
    ref = np.zeros((2, 4, 4), np.uint8)
    ref[1, :2] = 1
    tr = ConfusionTracker(pred, ref)
    idx = (np.array([1, 1]), np.array([0, 3]), np.array([0, 0]))
    old = pred[idx].copy()
    pred[idx] = 5  # a label the tracker has not seen yet
    assert tr.apply_indices(idx, old, 5, which="pred") == 2
    # counts follow the ids in use (0, 1, 5), not the largest id
    np.testing.assert_array_equal(tr.ids, [0, 1, 5])
    assert tr.n_classes == 3
    np.testing.assert_array_equal(tr.confusion, slice_confusion(pred, ref, ids=tr.ids))
    assert tr.confusion[1, 1, 2] == 1  # reference 1, predicted 5, slice 1
    assert set(tr.metrics()["per_class"]) == {1, 5}


@pytest.mark.parametrize("top", [1, 3])  # binary masks take a fast path; 0-3 the general one
@pytest.mark.parametrize("shape", [(48, 60), (6, 40, 50)])
def test_incremental_equals_full_recount_after_random_edits(shape, top):
    rng = np.random.default_rng(1)
    edited = Labels((rng.random(shape) < 0.3).astype(np.uint8))
    reference = Labels((rng.random(shape) < 0.3).astype(np.uint8))
    tracker = ConfusionTracker(edited.data, reference.data)
    connect(tracker, edited, reference)
    seen = set()
    for step in range(300):
        layer = edited if rng.random() < 0.7 else reference
        op = int(rng.integers(6))
        seen.add(op)
        layer.selected_label = int(rng.integers(0, top + 1))
        layer.n_edit_dimensions = 2 if op == 2 or len(shape) == 2 else int(rng.choice([2, 3]))
        point = [int(rng.integers(s)) for s in shape]
        if op == 0:
            layer.brush_size = int(rng.integers(1, 15))
            layer.paint(point, layer.selected_label)
        elif op == 1:
            layer.fill(point, layer.selected_label)
        elif op == 2:
            corners = [[*point[:-2], rng.integers(shape[-2]), rng.integers(shape[-1])]
                       for _ in range(4)]  # fmt: skip
            layer.paint_polygon(np.array(corners), layer.selected_label)
        elif op == 3:
            idx = tuple(np.array([p]) for p in point)
            layer.data_setitem(idx, layer.selected_label)
        elif op == 4:
            layer.undo()
        else:
            layer.redo()
        full = slice_confusion(edited.data, reference.data, ids=tracker.ids)
        assert np.array_equal(tracker.confusion, full), f"step {step}, op {op}"
    assert seen == set(range(6))
    assert tracker.metrics()["dice"] == pytest.approx(
        overlap_metrics(edited.data, reference.data)["dice"]
    )


def test_assigning_data_recounts():
    edited = Labels(np.zeros((10, 10), np.uint8))
    reference = Labels(np.ones((10, 10), np.uint8))
    tracker = ConfusionTracker(edited.data, reference.data)
    connect(tracker, edited, reference)
    assert tracker.metrics()["dice"] == 0.0
    edited.data = np.ones((10, 10), np.uint8)
    assert tracker.metrics()["dice"] == 1.0


def test_slice_dice():
    pred = np.zeros((3, 4, 4), np.uint8)
    ref = np.zeros((3, 4, 4), np.uint8)
    pred[0, :2] = 1
    ref[0, :1] = 1
    ref[1, :1] = 1
    d = ConfusionTracker(pred, ref).slice_dice()
    np.testing.assert_allclose(d, [2 * 4 / 12, 0.0, 1.0])


def test_painting_65535_adds_one_row(monkeypatch):
    # issue 10 item 5: counts follow the ids in use; 64 MiB "available" would refuse 65536^2
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 64 << 20)
    pred = np.zeros((3, 6, 6), np.uint16)
    ref = np.zeros((3, 6, 6), np.uint16)
    ref[:, :3] = 117
    tr = ConfusionTracker(pred, ref)
    np.testing.assert_array_equal(tr.ids, [0, 1, 117])
    idx = (np.array([2, 2]), np.array([0, 5]), np.array([0, 0]))
    old = pred[idx].copy()
    pred[idx] = 65535
    tr.apply_indices(idx, old, 65535, which="pred")
    np.testing.assert_array_equal(tr.ids, [0, 1, 117, 65535])
    np.testing.assert_array_equal(tr.confusion, slice_confusion(pred, ref, ids=tr.ids))
    per_class = tr.metrics()["per_class"]
    assert set(per_class) == {117, 65535}
    assert per_class == overlap_metrics(pred, ref)["per_class"]
    tr.recount()
    np.testing.assert_array_equal(tr.ids, [0, 1, 117, 65535])


def test_adopting_own_counts_keeps_sparse_ids():
    # the Review widget counts on copies in a worker, then points the tracker at live arrays
    ref = np.zeros((2, 5, 5), np.uint8)
    ref[:, 1:4, 1:4] = 117
    pred = ref.copy()
    worker_side = ConfusionTracker(pred.copy(), ref.copy())
    worker_side.adopt(worker_side.confusion, pred, ref)
    np.testing.assert_array_equal(worker_side.ids, [0, 1, 117])
    assert set(worker_side.metrics()["per_class"]) == {117}
    dense = slice_confusion(pred, ref, 118)
    worker_side.adopt(dense, pred, ref)  # a dense count: rows are label values 0..117
    assert worker_side.n_classes == 118
    assert set(worker_side.metrics()["per_class"]) == {117}
