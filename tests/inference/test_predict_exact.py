"""Values, not invariants: tiled segmentation against closed forms and against one chunk."""

import numpy as np
import pytest
import torch

from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.inference import predict, tiling
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.inference.predict import iter_segment, segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.model import SegmentationModel


def tiny(dims=2, tile=(32, 32)):
    config = ModelConfig(spatial_dims=dims, depth=2, base_features=4, out_channels=2)
    return SegmentationModel.new(config, tile_shape=tile, seed=0)


def analytic(x: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities from 2 * x, voxel by voxel: the same whatever the tiling."""
    p = torch.sigmoid(2 * x[:, :1])
    return torch.cat([1 - p, p], dim=1)


@pytest.fixture
def analytic_model(monkeypatch):
    monkeypatch.setattr(predict, "make_predictor", lambda *a, **k: analytic)
    return tiny()


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((511, 237), (128, 128), 0.5),
        ((511, 237), (64, 64), 0.25),
        ((511, 237), (256, 256), 0.25),  # tile longer than the image along X
        ((100, 90), (256, 256), 0.0),  # tile larger than the image on both axes
        ((3, 61, 47), (32, 32), 0.5),  # a stack, slice by slice
    ],
)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_tiled_segmentation_equals_the_closed_form(analytic_model, shape, tile, overlap, blend):
    rng = np.random.default_rng(3)
    image = rng.normal(size=shape).astype(np.float32)
    config = InferenceConfig(
        tile_shape=tile, overlap=overlap, blend=blend, batch_size=3, precision="fp32"
    )
    result = segment(image, analytic_model, config=config, return_probabilities=True)
    lo, hi = percentile_range(image, analytic_model.normalization)
    x = apply_range(image[None], lo, hi)[0]
    p1 = 1 / (1 + np.exp(-2.0 * x.astype(np.float64)))
    np.testing.assert_allclose(result.probabilities[1], p1, rtol=0, atol=2e-6)
    np.testing.assert_allclose(result.probabilities[0], 1 - p1, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(result.labels, (p1 > 0.5).astype(np.uint8))


def _calls(monkeypatch):
    calls = []
    real = tiling.iter_sliding_window

    def counting(images, *args, **kwargs):
        calls.append(images.shape[0])
        return real(images, *args, **kwargs)

    monkeypatch.setattr(predict, "iter_sliding_window", counting)
    return calls


def test_many_chunks_give_what_one_chunk_gives(monkeypatch):
    model = tiny()
    image = np.random.default_rng(1).random((7, 40, 36)).astype(np.float32)
    config = InferenceConfig(
        tile_shape=(32, 32), overlap=0.5, batch_size=2, tta=True, precision="fp32"
    )
    calls = _calls(monkeypatch)
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 10**9)
    one = segment(image, model, config=config, return_probabilities=True)
    assert calls == [7]
    calls.clear()
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 40 * 36)  # one slice: chunks of batch_size
    steps = []
    many = run_to_end(
        iter_segment(image, model, config=config, return_probabilities=True), steps.append
    )
    assert calls == [2, 2, 2, 1]
    assert [s.done for s in steps] == sorted({s.done for s in steps})  # strictly rising
    assert steps[-1].done == steps[-1].total == 7 * 4
    np.testing.assert_array_equal(many.labels, one.labels)
    for name in ("probabilities", "uncertainty", "disagreement"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=0, atol=1e-6)
