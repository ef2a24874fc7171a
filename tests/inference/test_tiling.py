import numpy as np
import pytest
import torch

from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import (
    blend_weights,
    iter_sliding_window,
    sliding_window,
    tile_starts,
)


def double(x):
    return 2 * x


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((511, 237), (64, 64)),
        ((511, 237), (256, 256)),  # tile larger than the image along X
        ((100, 90), (128, 128)),  # tile larger than the image along both axes
        ((1, 1), (16, 16)),
        ((37, 1), (8, 8)),
        ((9, 33, 21), (4, 16, 16)),
        ((1, 40, 41), (8, 16, 16)),  # one-slice stack
    ],
)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_stitching_is_exact(shape, tile, overlap, blend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *shape)).astype(np.float32)
    out = sliding_window(
        x, double, tile_shape=tile, out_channels=3, overlap=overlap, blend=blend, batch_size=3
    )
    assert out.shape == x.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 2 * x, rtol=1e-5, atol=1e-5)


def test_predictor_sees_full_tiles_only():
    seen = []

    def spy(t):
        seen.append(tuple(t.shape))
        return t[:, :1] * 0 + 1

    x = np.zeros((1, 2, 50, 300), np.float32)
    out = sliding_window(x, spy, tile_shape=(64, 64), out_channels=1, overlap=0.25, batch_size=4)
    assert {s[1:] for s in seen} == {(2, 64, 64)}
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_tile_starts_cover_axis():
    for size in [1, 5, 64, 100, 511, 1000]:
        for tile in [1, 7, 64, 256]:
            for overlap in [0.0, 0.3, 0.75]:
                starts = tile_starts(size, tile, overlap)
                t = min(tile, size)
                covered = np.zeros(size, bool)
                for s in starts:
                    covered[s : s + t] = True
                assert covered.all()
                assert starts[-1] + t == size
                assert starts == sorted(set(starts))


def test_gaussian_weights_peak_in_centre():
    w = blend_weights((33, 17))
    assert w.shape == (33, 17)
    assert w[16, 8] == pytest.approx(1.0)
    assert w.min() == pytest.approx(1e-3)  # MONAI's floor: corners of a 33 x 17 tile are lower
    assert w[0, 0] < w[16, 8]
    assert not w.flags.writeable


def test_generator_yields_progress_and_stops_when_closed():
    calls = []

    def slow(t):
        calls.append(1)
        return t

    x = np.zeros((4, 1, 64, 64), np.float32)
    gen = iter_sliding_window(
        x, slow, tile_shape=(16, 16), out_channels=1, overlap=0.0, batch_size=4
    )
    first = next(gen)
    assert (first.done, first.total) == (4, 64)
    second = next(gen)
    assert second.done == 8
    gen.close()
    assert len(calls) == 2


def test_oom_retries_with_smaller_batches(caplog):
    sizes = []

    def picky(t):
        sizes.append(t.shape[0])
        if t.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return 2 * t

    x = np.random.default_rng(1).random((1, 1, 64, 64), dtype=np.float32)
    out = sliding_window(x, picky, tile_shape=(16, 16), out_channels=1, overlap=0.0, batch_size=8)
    np.testing.assert_allclose(out, 2 * x, rtol=1e-6)
    assert sizes[:3] == [8, 4, 2]
    assert set(sizes[3:]) == {2}
    assert "retrying with batch size 4" in caplog.text


def test_oom_at_batch_one_is_a_clear_error():
    def hopeless(t):
        raise RuntimeError("CUDA error: out of memory")

    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(InputError, match="even with one tile"):
        sliding_window(x, hopeless, tile_shape=(16, 16), out_channels=1, batch_size=2)


def test_other_errors_propagate():
    def broken(t):
        raise RuntimeError("shape mismatch somewhere")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        sliding_window(
            np.zeros((1, 1, 8, 8), np.float32), broken, tile_shape=(8, 8), out_channels=1
        )


def test_wrong_predictor_output_is_explained():
    with pytest.raises(InputError, match="predictor returned shape"):
        sliding_window(
            np.zeros((1, 1, 8, 8), np.float32), double, tile_shape=(8, 8), out_channels=2
        )


def test_tile_rank_mismatch():
    with pytest.raises(InputError, match="tile_shape"):
        sliding_window(
            np.zeros((1, 1, 8, 8), np.float32), double, tile_shape=(8, 8, 8), out_channels=1
        )
