"""Scores of units read block by block: numpy, zarr and dask give the same scores and ranking."""

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_segtool.active_learning import make_units, rank, score_units
from napari_segtool.active_learning.scoring import ValueRangeError, iter_score_units
from napari_segtool.inference.tiling import run_to_end


class Reads:
    """An array that records the boxes read from it."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.keys = []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.data[key]


def volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    unc = rng.random(shape, dtype=np.float32) ** 3
    labels = (rng.random(shape) < 0.4).astype(np.uint8)
    return unc, labels


def stored(arr, kind, tmp_path, chunks):
    if kind == "numpy":
        return arr
    z = zarr.open_array(tmp_path / f"{arr.dtype}.zarr", mode="w", shape=arr.shape,
                        chunks=chunks, dtype=arr.dtype)  # fmt: skip
    z[...] = arr
    return z if kind == "zarr" else da.from_zarr(z)


@pytest.mark.parametrize("kind", ["zarr", "dask"])
@pytest.mark.parametrize("reduce", ["mean", "top"])
@pytest.mark.parametrize(
    ("shape", "tile", "chunks", "block_voxels"),
    [
        ((9, 20, 24), None, (4, 20, 24), 1),  # one slice per block
        ((9, 20, 24), None, (4, 10, 12), 3 * 480),  # three slices per block
        ((70, 90), 32, (16, 16), 32 * 64),  # two tiles of a tile row per block
        ((70, 90), 32, (70, 90), 10**6),  # a tile row per block (the edge tiles are smaller)
    ],
)
def test_lazy_scores_and_ranking_equal_the_in_memory_ones(
    kind, reduce, shape, tile, chunks, block_voxels, tmp_path
):
    unc, labels = volume(shape)
    units = make_units(shape, tile=tile)
    expected = score_units(units, unc, labels, reduce=reduce)
    lazy_unc = stored(unc, kind, tmp_path, chunks)
    lazy_labels = stored(labels, kind, tmp_path, chunks)
    progress = []
    scored = run_to_end(
        iter_score_units(units, lazy_unc, lazy_labels, reduce=reduce, block_voxels=block_voxels),
        progress.append,
    )
    assert scored == expected  # same floats, not approximately
    assert progress[-1].done == progress[-1].total == len(units)
    assert progress[-1].low == float(np.min(unc))
    assert progress[-1].high == float(np.max(unc))
    for strategy in ("uncertainty", "foreground-random"):
        assert rank(scored, strategy=strategy) == rank(expected, strategy=strategy)


def test_blocks_are_read_once_and_bounded():
    unc, _ = volume((8, 10, 10))
    r = Reads(unc)
    score_units(make_units(unc.shape), r)  # default block: the whole small stack at once
    assert r.keys == [(slice(0, 8), slice(0, 10), slice(0, 10))]
    r.keys.clear()
    run_to_end(iter_score_units(make_units(unc.shape), r, block_voxels=300))
    assert [k[0] for k in r.keys] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    tiles = Reads(unc[0])
    run_to_end(iter_score_units(make_units((10, 10), tile=4), tiles, block_voxels=32))
    assert all(np.prod([s.stop - s.start for s in k]) <= 32 for k in tiles.keys)
    # two blocks per full tile row (32 voxels at most), one for the 2-row edge row
    assert [k[0].stop - k[0].start for k in tiles.keys] == [4, 4, 4, 4, 2]


def test_values_outside_the_range_stop_at_the_block_that_holds_them():
    unc = np.zeros((6, 4, 4), np.float32)
    unc[4, 0, 0] = 3.0
    r = Reads(unc)
    gen = iter_score_units(make_units(unc.shape), r, value_range=(0.0, 1.0), block_voxels=32)
    assert [p.done for p in (next(gen), next(gen))] == [2, 4]
    with pytest.raises(ValueRangeError, match=r"from 0 to 3") as info:
        next(gen)
    assert info.value.high == 3.0
    assert len(r.keys) == 3
    nan = np.full((2, 3, 3), np.nan, np.float32)
    with pytest.raises(ValueRangeError, match="nan"):
        run_to_end(iter_score_units(make_units(nan.shape), nan, value_range=(0.0, 1.0)))


def test_no_uncertainty_scores_zero_with_the_foreground():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[1, :2] = 1
    scored = score_units(make_units(labels.shape), None, labels)
    assert [(u.score, u.foreground) for u in scored] == [(0.0, 0.0), (0.0, 0.5), (0.0, 0.0)]


@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask"])
def test_effort_and_a_block_map_score_lazily_as_in_memory(kind, tmp_path):
    """Expected effort is the unit's uncertainty summed; a map computed box by box
    (signals.BlockMap) over arrays on disk scores as the same map held in memory."""
    from napari_segtool.active_learning.signals import BlockMap, version_change

    shape = (6, 20, 24)
    unc, labels = volume(shape)
    previous = np.roll(labels, 3, axis=2)
    units = make_units(shape, tile=8)
    lazy = {name: stored(a, kind, tmp_path / name, (2, 10, 12))
            for name, a in (("unc", unc), ("lab", labels), ("prev", previous))}  # fmt: skip
    scored = run_to_end(iter_score_units(
        units, BlockMap(version_change, lazy["lab"], lazy["prev"]), lazy["lab"],
        effort=lazy["unc"], block_voxels=2 * 20 * 24,
    ))  # fmt: skip
    expected = score_units(units, version_change(labels, previous), labels)
    assert [u.score for u in scored] == pytest.approx([u.score for u in expected])
    for u in scored:
        assert u.effort == pytest.approx(float(unc[u.region].sum(dtype=np.float64)), rel=1e-6)
    assert all(u.effort is None for u in expected)  # not estimated without an effort map
