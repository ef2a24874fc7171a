"""Blockwise metrics against the in-memory ones: the same integer counts, the same numbers."""

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_segtool.errors import InputError
from napari_segtool.io.zarr_io import RegionView
from napari_segtool.metrics import (
    compact_confusion,
    confusion_blockwise,
    evaluate,
    evaluate_blockwise,
)
from napari_segtool.metrics.tracker import block_units


def _pair(shape, ids, seed):
    """Labels from ``ids`` with a prediction that agrees on about 70 % of the voxels."""
    rng = np.random.default_rng(seed)
    ref = rng.choice(ids, size=shape).astype(np.uint16)
    pred = np.where(rng.random(shape) < 0.7, ref, rng.choice(ids, size=shape)).astype(np.uint16)
    return pred, ref


def _late_ids():
    """Ids that first occur in the last slices: the table must grow, keeping its counts."""
    pred, ref = _pair((9, 12, 10), [0, 1, 2], 1)
    pred[7, :3] = 65535
    ref[8, 5:] = 117
    pred[8, 0, 0] = 4
    return pred, ref


CASES = {
    "binary": _pair((7, 11, 13), [0, 1], 0),
    "sparse": _pair((6, 9, 8), [0, 5, 117, 4000], 2),
    "late-ids": _late_ids(),
    "2d": _pair((23, 17), [0, 1, 2], 3),
    "bool": tuple(a.astype(bool) for a in _pair((5, 8, 8), [0, 1], 4)),
    "empty-pred": (np.zeros((4, 6, 6), np.uint8), _pair((4, 6, 6), [0, 3], 5)[1]),
    "all-background": (np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_voxels", [1, 150, 10**6])
def test_overlap_and_per_slice_equal_evaluate_exactly(case, block_voxels):
    pred, ref = CASES[case]
    want = evaluate(pred, ref, distances=False, per_slice=True)
    got = evaluate_blockwise(pred, ref, distances=False, per_slice=True,
                             block_voxels=block_voxels)  # fmt: skip
    assert got == want  # every float identical, keys in the same order
    assert list(got) == list(want)
    ids, cm = confusion_blockwise(pred, ref, block_voxels=block_voxels)
    want_ids, want_cm = compact_confusion(pred, ref)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(cm, want_cm)


@pytest.mark.parametrize("kind", ["zarr", "dask", "region"])
def test_lazy_inputs_give_the_same_numbers(tmp_path, kind):
    pred, ref = CASES["sparse"]
    if kind == "zarr":
        p = zarr.create_array(tmp_path / "p.zarr", shape=pred.shape, chunks=(2, 5, 8),
                              dtype=pred.dtype)  # fmt: skip
        r = zarr.create_array(tmp_path / "r.zarr", shape=ref.shape, chunks=(3, 9, 8),
                              dtype=ref.dtype)  # fmt: skip
        p[:], r[:] = pred, ref
        want = evaluate(pred, ref, distances=False, per_slice=True)
    elif kind == "dask":
        p, r = da.from_array(pred, chunks=(2, 4, 4)), da.from_array(ref, chunks=(5, 9, 8))
        want = evaluate(pred, ref, distances=False, per_slice=True)
    else:
        box = (slice(1, 5), slice(2, None), slice(None, 6))
        p, r = RegionView(pred, box), RegionView(ref, box)
        want = evaluate(pred[box], ref[box], distances=False, per_slice=True)
    seen = []
    got = evaluate_blockwise(p, r, distances=False, per_slice=True, block_voxels=100,
                             progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert got == want
    assert seen[-1][0] == seen[-1][1] == p.shape[0]
    assert len(seen) > 1


def test_distances_within_the_limit_are_evaluates(tmp_path):
    pred, ref = CASES["sparse"]
    z = zarr.create_array(tmp_path / "p.zarr", shape=pred.shape, dtype=pred.dtype)
    z[:] = pred
    got = evaluate_blockwise(z, ref, spacing=(2.0, 0.5, 0.5), per_slice=True)
    want = evaluate(pred, ref, spacing=(2.0, 0.5, 0.5), per_slice=True)
    assert got == want
    assert got["hd"] is not None


def test_above_the_limit_distances_are_refused_or_per_slice():
    pred, ref = CASES["sparse"]
    limit = pred.size - 1
    with pytest.raises(InputError, match=r"only up to 431 voxels and these labels have 432"):
        evaluate_blockwise(pred, ref, max_distance_voxels=limit)
    got = evaluate_blockwise(pred, ref, spacing=(2.0, 0.5, 0.25), per_slice=True,
                             max_distance_voxels=limit, block_voxels=100)  # fmt: skip
    want = evaluate(pred, ref, distances=False, per_slice=True)
    assert {k: v for k, v in got.items() if k != "per_slice"} == {
        k: v for k, v in want.items() if k != "per_slice"
    }
    assert got["hd"] is None
    for z, (entry, base) in enumerate(zip(got["per_slice"], want["per_slice"], strict=True)):
        assert {k: v for k, v in entry.items() if k not in ("hd", "hd95", "assd")} == base
        # each slice's distances are evaluate's of that slice, with the in-plane spacing
        alone = evaluate(pred[z], ref[z], spacing=(0.5, 0.25))
        assert (entry["hd"], entry["hd95"], entry["assd"]) == (
            alone["hd"], alone["hd95"], alone["assd"])  # fmt: skip
    with pytest.raises(InputError, match="per slice"):  # a 2D image has no slices
        evaluate_blockwise(pred[0], ref[0], per_slice=True, max_distance_voxels=10)


def test_bad_pairs_are_refused_before_reading():
    pred, ref = CASES["binary"]
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_blockwise(pred, ref[1:], distances=False)
    with pytest.raises(InputError, match="integer or boolean"):
        evaluate_blockwise(pred.astype(np.float32), ref, distances=False)
    neg = ref.astype(np.int16)
    neg[-1, -1, -1] = -3
    with pytest.raises(InputError, match="negative labels"):
        evaluate_blockwise(pred, neg, distances=False, block_voxels=100)


def test_blocks_are_whole_chunks_of_a_chunked_prediction(tmp_path):
    z = zarr.create_array(tmp_path / "p.zarr", shape=(100, 10, 10), chunks=(8, 10, 10),
                          dtype="u1")  # fmt: skip
    assert block_units(z, block_voxels=3000) == 24  # 30 slices fit: 3 whole chunks
    assert block_units(z, block_voxels=500) == 5  # under one chunk: as many slices as fit
    assert block_units(np.zeros((100, 10, 10)), block_voxels=3000) == 30
    assert block_units(da.from_array(np.zeros((100, 10, 10)), chunks=(8, 10, 10)),
                       block_voxels=3000) == 24  # fmt: skip
    with pytest.raises(InputError, match="block_voxels must be positive"):
        confusion_blockwise(z, z, block_voxels=0)
