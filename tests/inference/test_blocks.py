"""The block engine against in-memory inference: same tiles, same weights, bounded memory."""

import itertools
import tracemalloc

import numpy as np
import pytest
import torch

from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import predict
from napari_segtool.inference.blocks import (
    block_rows,
    iter_segment_blocks,
    iter_sliding_window_streamed,
    labels_dtype,
    segment_blocks,
    subsample_range,
    subsample_slices,
)
from napari_segtool.inference.normalize import percentile_range
from napari_segtool.inference.predict import segment
from napari_segtool.inference.predictor import make_predictor
from napari_segtool.inference.tiling import run_to_end, sliding_window
from napari_segtool.model import SegmentationModel

zarr = pytest.importorskip("zarr")


def tiny(dims, tile):
    config = ModelConfig(spatial_dims=dims, depth=2, base_features=4, out_channels=2)
    return SegmentationModel.new(config, tile_shape=tile, seed=0)


def balanced(model, image, config):
    """Shift the last layer's class-1 bias so that an untrained model predicts both classes."""
    p = segment(image, model, config=config, return_probabilities=True).probabilities
    d = np.log(np.clip(p[1], 1e-12, 1)) - np.log(np.clip(p[0], 1e-12, 1))
    last = [m for m in model.network.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    with torch.no_grad():
        last[-1].bias[1] -= float(np.median(d))
    return model


def analytic(x: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities from 2 * x, voxel by voxel: the same whatever the tiling."""
    p = torch.sigmoid(2 * x[:, :1])
    return torch.cat([1 - p, p], dim=1)


def streamed(image, predictor, **kwargs):
    """Run the streamed tiler; the blocks assembled, and the (a, b) ranges the sink saw."""
    out = np.full((kwargs["out_channels"], *image.shape[1:]), np.nan, np.float32)
    seen = []

    def sink(a, b, block):
        assert block.dtype == np.float32
        assert block.shape == (kwargs["out_channels"], b - a, *image.shape[2:])
        seen.append((a, b))
        out[:, a:b] = block

    run_to_end(iter_sliding_window_streamed(image, predictor, sink=sink, **kwargs))
    return out, seen


CASES = [
    ((37, 29), (16, 16)),
    ((45, 33, 27), (8, 16, 16)),
]


@pytest.mark.parametrize(("spatial", "tile"), CASES)
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_equals_in_memory_for_an_analytic_predictor(spatial, tile, overlap, batch_size):
    image = np.random.default_rng(2).normal(size=(1, *spatial)).astype(np.float32)
    kwargs = {
        "tile_shape": tile,
        "out_channels": 2,
        "overlap": overlap,
        "batch_size": batch_size,
    }
    ref = sliding_window(image[None], analytic, **kwargs)[0]
    out, seen = streamed(image, analytic, **kwargs)
    # the sink saw [0, S0) once, in order, in more than one block
    assert seen[0][0] == 0
    assert seen[-1][1] == spatial[0]
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(seen))
    assert len(seen) > 1
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    p1 = 1 / (1 + np.exp(-2.0 * image[0].astype(np.float64)))
    np.testing.assert_allclose(out[1], p1, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("spatial", "tile"), CASES)
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_equals_in_memory_for_a_real_unet(spatial, tile, overlap, batch_size):
    model = tiny(len(spatial), tile)
    predictor = make_predictor(model, torch.device("cpu"), precision="fp32")
    image = np.random.default_rng(4).normal(size=(1, *spatial)).astype(np.float32)
    kwargs = {
        "tile_shape": tile,
        "out_channels": 2,
        "overlap": overlap,
        "batch_size": batch_size,
    }
    ref = sliding_window(image[None], predictor, **kwargs)[0]
    out, _ = streamed(image, predictor, **kwargs)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    same = out.argmax(0) == ref.argmax(0)
    assert same.mean() >= 0.9999
    clear = np.abs(ref[1] - ref[0]) > 1e-4
    assert same[clear].all()


def test_streamed_reads_lazy_zarr_input(tmp_path):
    image = np.random.default_rng(5).normal(size=(1, 45, 33, 27)).astype(np.float32)
    store = zarr.open(str(tmp_path / "in.zarr"), mode="w", shape=image.shape,
                      chunks=(1, 8, 33, 27), dtype="f4")  # fmt: skip
    store[:] = image
    kwargs = {"tile_shape": (8, 16, 16), "out_channels": 2, "overlap": 0.5, "batch_size": 3}
    ref = sliding_window(image[None], analytic, **kwargs)[0]
    out, _ = streamed(store, analytic, **kwargs)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def _peak(image, predictor, run_streamed):
    kwargs = {"tile_shape": (8, 16, 16), "out_channels": 2, "overlap": 0.25, "batch_size": 2}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        if run_streamed:
            gen = iter_sliding_window_streamed(
                image, predictor, sink=lambda a, b, block: None, **kwargs
            )
            run_to_end(gen)
        else:
            sliding_window(image[None], predictor, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_peak_memory_is_bounded_by_the_tile_not_the_volume():
    model = tiny(3, (8, 16, 16))
    predictor = make_predictor(model, torch.device("cpu"), precision="fp32")
    rng = np.random.default_rng(6)
    short = rng.normal(size=(1, 16, 48, 48)).astype(np.float32)
    long = rng.normal(size=(1, 128, 48, 48)).astype(np.float32)
    growth = (long.size - short.size) * 2 * 4  # float32 class scores of the extra rows
    peak_short = _peak(short, predictor, run_streamed=True)
    peak_long = _peak(long, predictor, run_streamed=True)
    assert peak_long - peak_short <= 0.05 * growth, (peak_short, peak_long, growth)
    # the in-memory tiler does grow with the volume: the measurement can tell them apart
    assert _peak(long, predictor, run_streamed=False) - peak_long > 0.5 * growth


def test_closing_the_generator_cancels_and_calls_no_sink_afterwards():
    image = np.random.default_rng(7).normal(size=(1, 45, 33, 27)).astype(np.float32)
    calls = []
    gen = iter_sliding_window_streamed(
        image, analytic, tile_shape=(8, 16, 16), out_channels=2, overlap=0.5, batch_size=1,
        sink=lambda a, b, block: calls.append((a, b)),
    )  # fmt: skip
    steps = [next(gen) for _ in range(40)]
    assert steps[-1].done == 40 < steps[-1].total
    before = list(calls)
    assert before
    assert before[-1][1] < 45
    gen.close()
    assert calls == before
    with pytest.raises(StopIteration):
        next(gen)
    assert calls == before


def _zarr_out(tmp_path, name, shape, dtype, fill):
    return zarr.open(str(tmp_path / name), mode="w", shape=shape, chunks=(4, *shape[1:]),
                     dtype=dtype, fill_value=fill)  # fmt: skip


@pytest.mark.parametrize(
    ("dims", "tile", "shape"),
    [(3, (8, 16, 16), (13, 30, 28)), (2, (32, 32), (7, 40, 36))],
)
def test_segment_blocks_into_zarr_equals_segment(tmp_path, monkeypatch, dims, tile, shape):
    # a 2D model works in 3 chunks of slices
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 3 * shape[1] * shape[2])
    model = tiny(dims, tile)
    image = (np.random.default_rng(8).random(shape) * 1000).astype(np.uint16)
    config = InferenceConfig(tile_shape=tile, overlap=0.5, batch_size=3, tta=True,
                             precision="fp32", compile="off")  # fmt: skip
    value_range = percentile_range(image, model.normalization)
    model = balanced(model, image, config)
    ref = segment(image, model, config=config, return_probabilities=True)
    src = zarr.open(str(tmp_path / "in.zarr"), mode="w", shape=shape, chunks=(4, *shape[1:]),
                    dtype=image.dtype)  # fmt: skip
    src[:] = image
    labels = _zarr_out(tmp_path, "labels.zarr", shape, ref.labels.dtype, 255)
    unc = _zarr_out(tmp_path, "unc.zarr", shape, "f4", -1.0)
    probs = zarr.open(str(tmp_path / "p.zarr"), mode="w", shape=(2, *shape), dtype="f4")
    seen = []
    segment_blocks(src, model, config=config, value_range=value_range, labels_out=labels,
                   uncertainty_out=unc, probabilities_out=probs,
                   progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seen[-1][0] == seen[-1][1]
    np.testing.assert_array_equal(labels[:], ref.labels)
    np.testing.assert_allclose(unc[:], ref.uncertainty, rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs[:], ref.probabilities, rtol=0, atol=1e-5)
    assert 0.1 < ref.labels.mean() < 0.9  # both classes occur: the comparison means something


def test_segment_blocks_uses_the_models_label_values():
    model = tiny(3, (8, 16, 16))
    model.label_values = (0, 7)
    image = np.random.default_rng(9).random((12, 20, 20)).astype(np.float32)
    config = InferenceConfig(precision="fp32", overlap=0.5)
    value_range = percentile_range(image, model.normalization)
    ref = segment(image, model, config=config, value_range=value_range)
    labels = np.zeros(image.shape, np.uint8)
    segment_blocks(image, model, config=config, value_range=value_range, labels_out=labels)
    np.testing.assert_array_equal(labels, ref.labels)
    assert set(np.unique(labels)) <= {0, 7}


def test_cancelled_segment_blocks_writes_nothing_more(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = np.random.default_rng(10).random((40, 20, 20)).astype(np.float32)
    labels = _zarr_out(tmp_path, "labels.zarr", image.shape, "u1", 255)
    gen = iter_segment_blocks(
        image, model, config=InferenceConfig(precision="fp32", batch_size=1, overlap=0.5),
        value_range=percentile_range(image, model.normalization), labels_out=labels,
    )  # fmt: skip
    for _ in range(15):
        next(gen)
    gen.close()
    written = labels[:]
    assert (written[:4] != 255).all()  # the first rows were final and written
    assert (written[-8:] == 255).all()  # the last were never reached
    np.testing.assert_array_equal(labels[:], written)


def test_segment_blocks_validates_outputs():
    model = tiny(3, (8, 16, 16))
    image = np.zeros((12, 20, 20), np.float32)
    vr = (np.array([0.0]), np.array([1.0]))
    with pytest.raises(InputError, match="labels_out has shape"):
        segment_blocks(image, model, value_range=vr, labels_out=np.zeros((12, 20), np.uint8))
    with pytest.raises(InputError, match="tta"):
        segment_blocks(image, model, value_range=vr, labels_out=np.zeros(image.shape, np.uint8),
                       uncertainty_out=np.zeros(image.shape, np.float32))  # fmt: skip
    with pytest.raises(InputError, match=r"\(Z, Y, X\)"):
        segment_blocks(image[0, 0], model, value_range=vr, labels_out=np.zeros(20, np.uint8))
    with pytest.raises(InputError, match="counts_out has shape"):
        segment_blocks(image, model, value_range=vr, labels_out=np.zeros(image.shape, np.uint8),
                       counts_out=np.zeros(3, np.int64))  # fmt: skip
    with pytest.raises(InputError, match="not a non-empty range"):
        segment_blocks(image, model, value_range=vr, labels_out=np.zeros(image.shape, np.uint8),
                       region=(slice(0, 13), slice(None), slice(None)))  # fmt: skip


class _Reads:
    """An array that records which first-axis indices were read."""

    def __init__(self, data):
        self.data, self.shape, self.read = data, data.shape, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.data[key]


def test_subsample_range_reads_evenly_spaced_slices_within_budget():
    model = tiny(3, (8, 16, 16))
    image = (np.random.default_rng(11).random((50, 16, 16)) * 4000).astype(np.uint16)
    whole = subsample_range(image, model.normalization, max_voxels=image.size)
    ref = percentile_range(image, model.normalization)
    np.testing.assert_array_equal(whole[0], ref[0])
    np.testing.assert_array_equal(whole[1], ref[1])
    lazy = _Reads(image)
    lo, hi = subsample_range(lazy, model.normalization, max_voxels=10 * 256, seed=3)
    assert len(lazy.read) == 10
    assert all(isinstance(k, int) for k in lazy.read)
    gaps = np.diff(lazy.read)
    assert gaps.min() >= 4  # evenly spaced over 50 slices
    assert gaps.max() <= 6
    np.testing.assert_allclose([lo[0], hi[0]], [ref[0][0], ref[1][0]], rtol=0, atol=40)
    again = _Reads(image)
    subsample_range(again, model.normalization, max_voxels=10 * 256, seed=3)
    assert again.read == lazy.read  # seeded


@pytest.mark.parametrize(
    ("dims", "tile", "shape", "region"),
    [
        (3, (8, 16, 16), (21, 30, 28), (slice(3, 17), slice(5, 29), slice(None, 20))),
        (2, (16, 16), (9, 40, 36), (slice(2, None), slice(None), slice(7, 30))),
        (2, (16, 16), (40, 36), (slice(1, 39), slice(3, None))),
        (3, (4, 16, 16), (40, 36), (slice(None, 25), slice(None))),
    ],
)
def test_a_region_equals_segment_of_the_crop_with_the_whole_range(
    tmp_path, monkeypatch, dims, tile, shape, region
):
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 40 * 36)  # a 2D model: several chunks
    model = tiny(dims, tile)
    image = (np.random.default_rng(12).random(shape) * 1000).astype(np.uint16)
    config = InferenceConfig(tile_shape=tile, overlap=0.5, batch_size=2, precision="fp32",
                             compile="off")  # fmt: skip
    value_range = percentile_range(image, model.normalization)  # the whole image's
    model = balanced(model, image, config)
    crop = image[region]
    ref = segment(crop, model, config=config, value_range=value_range,
                  return_probabilities=True)  # fmt: skip
    src = zarr.open(str(tmp_path / "in.zarr"), mode="w", shape=shape, dtype=image.dtype,
                    chunks=(3, *shape[1:]) if len(shape) == 3 else (7, 9))  # fmt: skip
    src[:] = image
    labels = np.full(crop.shape, 255, labels_dtype(model))
    probs = np.full((2, *crop.shape), np.nan, np.float32)
    counts = np.zeros(2, np.int64)
    segment_blocks(src, model, config=config, value_range=value_range, labels_out=labels,
                   probabilities_out=probs, region=region, counts_out=counts)  # fmt: skip
    np.testing.assert_array_equal(labels, ref.labels)
    np.testing.assert_allclose(probs, ref.probabilities, rtol=0, atol=1e-5)
    assert counts.tolist() == [int((ref.labels == 0).sum()), int((ref.labels == 1).sum())]
    assert counts.sum() == crop.size
    assert 0.05 < ref.labels.mean() < 0.95


def test_a_2d_image_with_tta_equals_segment():
    model = tiny(2, (16, 16))
    image = np.random.default_rng(13).random((37, 29)).astype(np.float32)
    config = InferenceConfig(tile_shape=(16, 16), overlap=0.5, tta=True, precision="fp32",
                             compile="off")  # fmt: skip
    vr = percentile_range(image, model.normalization)
    ref = segment(image, model, config=config, value_range=vr)
    labels = np.zeros(image.shape, np.uint8)
    unc = np.full(image.shape, -1, np.float32)
    segment_blocks(image, model, config=config, value_range=vr, labels_out=labels,
                   uncertainty_out=unc)  # fmt: skip
    np.testing.assert_array_equal(labels, ref.labels)
    np.testing.assert_allclose(unc, ref.uncertainty, rtol=0, atol=1e-5)


class _Writes:
    """An output that records the row ranges written to it."""

    def __init__(self, shape):
        self.shape, self.rows = shape, []

    def __setitem__(self, key, value):
        rows = key if isinstance(key, slice) else key[0]
        self.rows.append((rows.start, rows.stop))


@pytest.mark.parametrize(
    ("dims", "tile", "shape", "overlap"),
    [(2, (16, 16), (23, 20, 20), 0.25), (3, (8, 16, 16), (45, 20, 20), 0.25),
     (3, (7, 16, 16), (30, 20, 20), 0.5), (3, (8, 16, 16), (5, 20, 20), 0.25)],
)  # fmt: skip
def test_writes_follow_block_rows(monkeypatch, dims, tile, shape, overlap):
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 5 * 20 * 20)
    model = tiny(dims, tile)
    config = InferenceConfig(tile_shape=tile, overlap=overlap, precision="fp32", compile="off")
    rows = block_rows(shape, model, config=config)
    out = _Writes(shape)
    image = np.random.default_rng(14).random(shape).astype(np.float32)
    segment_blocks(image, model, config=config, labels_out=out,
                   value_range=(np.array([0.0]), np.array([1.0])))  # fmt: skip
    starts = [a for a, _ in out.rows]
    assert out.rows[0][0] == 0
    assert out.rows[-1][1] == shape[0]
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(out.rows))
    # every write but the last (3D: the last two) starts on a multiple of block_rows
    regular = starts[:-1] if dims == 3 else starts
    assert all(a % rows == 0 for a in regular), (rows, out.rows)
    # so chunks of `rows` slices are written whole; at most one is written twice
    chunks = [set(range(a // rows, -(-b // rows))) for a, b in out.rows]
    touched = [c for cs in chunks for c in cs]
    assert len(touched) - len(set(touched)) <= (1 if dims == 3 else 0)


def test_subsample_slices_matches_subsample_range():
    image = _Reads(np.random.default_rng(15).random((30, 8, 8)))
    index, stride = subsample_slices(image.shape, max_voxels=7 * 64, seed=2)
    subsample_range(image, tiny(3, (8, 16, 16)).normalization, max_voxels=7 * 64, seed=2)
    assert image.read == index
    assert stride == 1
    assert len(index) == 7
    index, stride = subsample_slices((2, 1000, 10), max_voxels=1000)
    assert (len(index), stride) == (1, 10)  # one slice alone is over budget: every 10th row


class _FailingOut:
    """An output whose second write fails (a full disk, say)."""

    def __init__(self, shape):
        self.shape, self.writes = shape, 0

    def __setitem__(self, key, value):
        self.writes += 1
        if self.writes == 2:
            raise OSError(28, "No space left on device")


def test_a_failed_write_on_the_writer_thread_is_raised(monkeypatch):
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 20 * 20)
    model = tiny(2, (16, 16))
    image = np.random.default_rng(16).random((9, 20, 20)).astype(np.float32)
    out = _FailingOut(image.shape)
    with pytest.raises(OSError, match="No space left"):
        segment_blocks(image, model, labels_out=out, config=InferenceConfig(precision="fp32"),
                       value_range=(np.array([0.0]), np.array([1.0])))  # fmt: skip
    assert out.writes == 2  # nothing is written after the failure


def _segment_peak(tmp_path, z, model, config):
    from napari_segtool.io.zarr_io import OmeZarrWriter

    image = zarr.open(str(tmp_path / f"in{z}.zarr"), mode="w", shape=(z, 128, 128),
                      chunks=(1, 64, 64), dtype="u1")  # fmt: skip
    image[:] = np.random.default_rng(17).integers(0, 255, (z, 128, 128), dtype=np.uint8)
    rows = block_rows(image.shape, model, config=config)
    tracemalloc.start()
    try:
        with OmeZarrWriter(tmp_path / f"out{z}.zarr", shape=image.shape, dtype="u1",
                           chunks=(rows, 64, 64)) as writer:  # fmt: skip
            segment_blocks(image, model, config=config, labels_out=writer.rows,
                           value_range=(np.array([0.0]), np.array([255.0])))  # fmt: skip
            writer.commit()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_segmenting_into_a_zarr_store_keeps_memory_flat_as_z_grows(tmp_path, monkeypatch):
    """Reads, scores, labels and the pyramid's rows: nothing accumulates per block, so four
    times the slices add less than one block's working set. (Both volumes have several
    chunks, so that reads and writes overlap the network in both.)"""
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 4 * 128 * 128)
    model = tiny(2, (128, 128))  # one tile a slice: the test measures the I/O, quickly
    config = InferenceConfig(tile_shape=(128, 128), batch_size=4, precision="fp32",
                             compile="off")  # fmt: skip
    _segment_peak(tmp_path, 4, model, config)  # imports and caches first
    short = _segment_peak(tmp_path, 16, model, config)
    long = _segment_peak(tmp_path, 64, model, config)
    block = 4 * 128 * 128 * (1 + 1 + 3 * 4)  # input, labels, scores and weights of one chunk
    assert long - short < block, (short, long, block)
    held = (64 - 16) * 128 * 128 * (1 + 2 * 4)  # what labels and scores in memory would add
    assert 5 * block < held
