import dask.array as da
import numpy as np
import pytest
import zarr
from napari.layers import Labels

from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.metrics import ConfusionTracker, overlap_metrics, slice_confusion, tracked_ids
from napari_segtool.metrics.tracker import EditStamps, iter_block_counts, iter_confusion_tracker


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


# -- blockwise counts of numpy, zarr and dask arrays (issue 14) -------------------------------


class Reads:
    """An array that records the boxes read from it (the test's view of memory use)."""

    def __init__(self, data, on_read=None):
        self.data, self.on_read = data, on_read
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.keys = []

    def __getitem__(self, key):
        self.keys.append(key)
        if self.on_read is not None:
            self.on_read(key)
        return self.data[key]


def sparse_pair(shape, seed=0):
    """Label ids 0, 3, 117 and one 65535 voxel: sparse ids, uint16."""
    rng = np.random.default_rng(seed)
    ids = np.array([0, 3, 117], np.uint16)
    pred = ids[rng.integers(0, 3, shape)]
    ref = ids[rng.integers(0, 3, shape)]
    pred[(0,) * len(shape)] = 65535
    return pred, ref


def as_kind(arr, kind, tmp_path, chunks):
    if kind == "numpy":
        return arr
    # a new name per call: the id of a temporary array can come back for the next one
    name = f"{arr.ndim}-{len(list(tmp_path.iterdir()))}.zarr"
    z = zarr.open_array(tmp_path / name, mode="w", shape=arr.shape,
                        chunks=chunks, dtype=arr.dtype)  # fmt: skip
    z[...] = arr
    return z if kind == "zarr" else da.from_zarr(z)


@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask"])
@pytest.mark.parametrize(
    ("shape", "chunks", "block_voxels", "band_rows"),
    [
        ((7, 12, 10), (3, 12, 10), 1, None),  # one slice per block
        ((7, 12, 10), (3, 12, 10), 2 * 120, None),  # two slices, rounded to none of a chunk
        ((7, 12, 10), (2, 6, 5), 7 * 120, None),  # the whole stack at once
        ((37, 23), (8, 23), 5 * 23, None),  # a 2D image, one unit, 8 blocks
        ((37, 23), (8, 23), 5 * 23, 4),  # ... in bands of 4 rows
        ((37, 23), (8, 23), 10**6, 37),  # ... one band, one block
    ],
)
def test_blockwise_count_equals_the_in_memory_count(
    kind, shape, chunks, block_voxels, band_rows, tmp_path
):
    pred, ref = sparse_pair(shape)
    p, r = as_kind(pred, kind, tmp_path, chunks), as_kind(ref, kind, tmp_path, chunks)
    gen = iter_confusion_tracker(p, r, band_rows=band_rows, block_voxels=block_voxels)
    progress = []
    tracker = run_to_end(gen, progress.append)
    np.testing.assert_array_equal(tracker.ids, tracked_ids(pred, ref))
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))
    assert tracker.complete
    assert progress[-1] == (tracker.n_units, tracker.n_units)
    assert [d for d, _ in progress] == sorted({d for d, _ in progress})  # strictly rising
    assert tracker.metrics() == ConfusionTracker(pred, ref).metrics()


def test_each_block_is_read_once_and_no_read_exceeds_a_block():
    pred, ref = sparse_pair((9, 8, 8))
    p, r = Reads(pred), Reads(ref)
    tracker = ConfusionTracker(p, r, count=False)
    for _ in tracker.iter_recount(block_voxels=2 * 64):
        pass
    for arr in (p, r):
        assert arr.keys == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 9)]
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))
    effort = np.zeros_like(pred)
    p.keys.clear()
    blocks = list(iter_block_counts(p, [ref, effort], units=[1, 2, 3, 7], block_voxels=2 * 64))
    assert p.keys == [slice(1, 2), slice(2, 4), slice(7, 8)]  # once for both references
    assert [(b.start, b.stop) for b, _ in blocks] == [(1, 2), (2, 4), (7, 8)]
    np.testing.assert_array_equal(blocks[1][1].counts.sum((1, 2)), [64, 64])


def test_chunks_along_the_first_axis_set_the_blocks(tmp_path):
    pred, ref = sparse_pair((12, 6, 6))
    z = as_kind(pred, "zarr", tmp_path, (4, 6, 6))
    blocks = [b for [b] in iter_block_counts(z, [ref], block_voxels=9 * 36)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 8), (8, 12)]  # 9 slices -> 2 chunks


def test_closing_the_generator_cancels_and_leaves_units_pending():
    pred, ref = sparse_pair((6, 4, 4))
    r = Reads(ref)
    tracker = ConfusionTracker(pred, r, count=False)
    gen = tracker.iter_recount(block_voxels=16)
    assert next(gen) == (1, 6)
    gen.close()
    assert len(r.keys) == 1
    np.testing.assert_array_equal(tracker.pending, [1, 2, 3, 4, 5])
    assert not tracker.complete
    for _ in tracker.iter_recount(tracker.pending):
        pass
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))


def test_bad_values_are_found_in_the_block_that_holds_them(tmp_path):
    pred = np.zeros((4, 3, 3), np.int16)
    pred[3, 1, 1] = -2
    tracker = ConfusionTracker(as_kind(pred, "zarr", tmp_path, (1, 3, 3)), np.zeros_like(pred),
                               count=False)  # fmt: skip
    gen = tracker.iter_recount(block_voxels=9)
    assert [next(gen) for _ in range(3)] == [(1, 4), (2, 4), (3, 4)]
    with pytest.raises(InputError, match="negative labels"):
        next(gen)
    with pytest.raises(InputError, match="float"):
        ConfusionTracker(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize("kind", ["zarr", "dask"])
@pytest.mark.parametrize(("shape", "band_rows"), [((40, 36), 6), ((5, 30, 32), None)])
def test_paint_events_on_lazy_arrays_stay_exact(kind, shape, band_rows, tmp_path):
    """napari paints into a zarr array; the tracker reads the other one lazily (zarr/dask)."""
    rng = np.random.default_rng(2)
    store = as_kind((rng.random(shape) < 0.3).astype(np.uint8), "zarr", tmp_path, shape)
    edited = Labels(store)
    ref = (rng.random(shape) < 0.3).astype(np.uint8)
    reference = as_kind(ref, kind, tmp_path, (2,) * len(shape))
    tracker = ConfusionTracker(edited.data, reference, band_rows=band_rows)
    edited.events.paint.connect(lambda e: tracker.apply_atoms(e.value, which="pred"))
    for step in range(36):
        edited.selected_label = int(rng.integers(0, 4))
        point = [int(rng.integers(s)) for s in shape]
        op = step % 3
        if op == 0:
            edited.brush_size = int(rng.integers(1, 12))
            edited.paint(point, edited.selected_label)
        elif op == 1:
            edited.fill(point, edited.selected_label)
        else:
            other = [int(rng.integers(s)) for s in shape]
            if other == point:
                continue
            idx = tuple(np.array([a, b]) for a, b in zip(point, other, strict=True))
            edited.data_setitem(idx, edited.selected_label)
    pred = np.asarray(edited.data[...])
    assert not np.array_equal(pred, np.asarray(store[...]) * 0)  # painted something
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))


def test_uncounted_units_ignore_paints_until_counted():
    pred = np.zeros((4, 5, 5), np.uint8)
    ref = np.ones((4, 5, 5), np.uint8)
    tracker = ConfusionTracker(pred, ref)
    tracker.uncount([2])
    idx = (np.array([1, 2, 2]), np.array([0, 0, 1]), np.array([0, 0, 0]))
    old = pred[idx].copy()
    pred[idx] = 1
    assert tracker.apply_indices(idx, old, 1, which="pred") == 3
    tracker.apply_box((slice(2, 3), slice(3, 5), slice(0, 5)), None, np.zeros(10, np.uint8), 1,
                      which="pred")  # fmt: skip
    pred[2, 3:5] = 1
    assert tracker.counts[2].sum() == 0  # left for its count
    for _ in tracker.iter_recount([2]):
        pass
    tracker.compact()
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))


def test_stamps_refuse_blocks_read_during_an_edit():
    """The Review widget's protocol without Qt: an edit while a block is read spoils it."""
    pred, ref = sparse_pair((6, 8, 8))
    ref = ref.copy()
    stamps = EditStamps(6)
    tracker = ConfusionTracker(pred, ref, count=False)

    def paint_during_the_read(key):  # an edit of slice 3 lands while slices 2-3 are read
        if key == slice(2, 4):
            stamps.begin([3])
            ref[3, :4] = 117
            stamps.end([3])

    r = Reads(ref, on_read=paint_during_the_read)
    for [block] in iter_block_counts(pred, [r], block_voxels=2 * 64, stamps=stamps):
        accept = stamps.unchanged(block)
        if block.start == 2:
            np.testing.assert_array_equal(accept, [True, False])
        tracker.put(block, accept=accept)
    np.testing.assert_array_equal(tracker.pending, [3])
    stamps.begin([5])  # under way: a block of slice 5 read now is refused...
    [[block]] = list(iter_block_counts(pred, [ref], units=[5], stamps=stamps))
    stamps.end([5])
    assert not stamps.unchanged(block).any()  # ...even once the edit has ended
    for [block] in iter_block_counts(pred, [ref], units=tracker.pending, stamps=stamps):
        tracker.put(block, accept=stamps.unchanged(block))
    assert tracker.complete
    np.testing.assert_array_equal(tracker.confusion, slice_confusion(pred, ref, ids=tracker.ids))
