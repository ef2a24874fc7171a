import numpy as np
import pytest
import torch

from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import iter_segment, resolve_device, segment
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.inference.predict import normalized_entropy
from napari_segtool.model import SegmentationModel


def tiny(dims=2, cin=1, cout=2, tile=None):
    tile = tile or ((32, 32) if dims == 2 else (8, 16, 16))
    return SegmentationModel.new(
        ModelConfig(
            spatial_dims=dims, depth=2, base_features=4, in_channels=cin, out_channels=cout
        ),
        tile_shape=tile,
        seed=0,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def direct_labels(model, image):
    """Reference: whole-image forward pass on the normalised image (one tile, no blending)."""
    lo, hi = percentile_range(image, model.normalization)
    x = apply_range(image[None], lo, hi)  # (C=1, *S)
    model.network.eval()  # segment() runs an eval copy and leaves the model's network alone
    with torch.inference_mode():
        if model.spatial_dims == 2 and image.ndim == 3:
            logits = model.network(torch.from_numpy(np.moveaxis(x, 1, 0).copy()))
            return logits.argmax(1).numpy()
        logits = model.network(torch.from_numpy(x[None].copy()))
        return logits.argmax(1)[0].numpy()


def test_2d_model_runs_slice_wise_on_a_stack(rng):
    model = tiny()
    image = rng.integers(0, 255, (5, 40, 30), dtype=np.uint8)
    result = segment(image, model, config=InferenceConfig(tile_shape=(64, 64), precision="fp32"))
    assert result.labels.shape == (5, 40, 30)
    assert result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, direct_labels(model, image))


def test_3d_model_runs_natively(rng):
    model = tiny(dims=3)
    image = rng.integers(0, 4000, (7, 20, 24), dtype=np.uint16)
    config = InferenceConfig(tile_shape=(8, 32, 32), precision="fp32")
    result = segment(image, model, config=config)
    assert result.labels.shape == (7, 20, 24)
    np.testing.assert_array_equal(result.labels, direct_labels(model, image))


def test_3d_model_on_a_2d_image(rng):
    model = tiny(dims=3)
    image = rng.normal(size=(25, 31)).astype(np.float32)
    assert segment(image, model).labels.shape == (25, 31)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_dtypes_and_odd_shapes(rng, dtype):
    image = (rng.random((511, 237)) * 200 - (50 if dtype == np.int16 else 0)).astype(dtype)
    result = segment(image, tiny(), config=InferenceConfig(tile_shape=(128, 128), overlap=0.5))
    assert result.labels.shape == (511, 237)
    assert set(np.unique(result.labels)) <= {0, 1}


def test_tiled_equals_whole_image_for_blended_constant_predictions(rng):
    # probabilities from overlapping tiles are averaged; they must stay a distribution
    image = rng.random((70, 90)).astype(np.float32)
    r = segment(
        image,
        tiny(),
        config=InferenceConfig(tile_shape=(32, 32), overlap=0.5),
        return_probabilities=True,
    )
    assert r.probabilities.shape == (2, 70, 90)
    np.testing.assert_allclose(r.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(r.labels, r.probabilities.argmax(0))


def test_image_smaller_than_tile_and_one_slice_stack(rng):
    model = tiny(tile=(256, 256))
    small = rng.random((1, 20, 11)).astype(np.float32)
    assert segment(small, model).labels.shape == (1, 20, 11)
    assert segment(rng.random((3, 2)), model).labels.shape == (3, 2)


def test_rgb_image_as_channels(rng):
    model = tiny(cin=3, cout=3)
    image = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    result = segment(image, model)
    assert result.labels.shape == (48, 40)
    rgba = np.concatenate([image, np.full((48, 40, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(segment(rgba, model, rgb=True).labels, result.labels)


def test_explicit_channel_axis(rng):
    model = tiny(dims=3, cin=2)
    image = rng.random((6, 2, 16, 16)).astype(np.float32)  # Z C Y X
    assert segment(image, model, channel_axis=1).labels.shape == (6, 16, 16)


def test_tta_gives_mean_probabilities_and_uncertainty(rng):
    image = rng.random((40, 40)).astype(np.float32)
    r = segment(image, tiny(), config=InferenceConfig(tta=True), return_probabilities=True)
    assert r.uncertainty.shape == (40, 40)
    assert r.uncertainty.dtype == np.float32
    assert r.uncertainty.min() >= 0.0
    assert r.uncertainty.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(r.uncertainty, normalized_entropy(r.probabilities), atol=1e-6)
    plain = segment(image, tiny(), return_probabilities=True)
    assert not np.allclose(plain.probabilities, r.probabilities)


def test_generator_reports_progress_and_cancels(rng):
    image = rng.random((6, 64, 64)).astype(np.float32)
    gen = iter_segment(
        image, tiny(), config=InferenceConfig(tile_shape=(32, 32), overlap=0.0, batch_size=4)
    )
    steps = [next(gen), next(gen)]
    assert [s.done for s in steps] == [4, 8]
    assert steps[0].total == 6 * 4
    gen.close()  # cancelling: no exception, nothing left running


def test_entropy_bounds():
    p = np.array([[1.0, 0.5, 0.9], [0.0, 0.5, 0.1]])
    h = normalized_entropy(p)
    assert h[0] == pytest.approx(0.0, abs=1e-9)
    assert h[1] == pytest.approx(1.0)
    assert 0 < h[2] < 1


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((2, 3, 8, 8), np.float32) + np.arange(8), {}, "channel_axis"),
        (np.ones((2, 2, 2, 8, 8)), {"channel_axis": 0}, "3 spatial axes|spatial axes"),
        (np.zeros((0, 8), np.float32), {}, "empty"),
        (np.full((16, 16), 7, np.uint8), {}, "constant"),
        (np.where(np.eye(16) > 0, np.nan, 1.0), {}, "16 non-finite value.*16 NaN"),
        (np.full((8, 8), np.inf), {}, "non-finite"),
        (np.array([["a", "b"], ["c", "d"]]), {}, "dtype"),
    ],
)
def test_bad_images_get_clear_errors(image, kwargs, message):
    with pytest.raises(InputError, match=message):
        segment(image, tiny(), **kwargs)


def test_channel_mismatch_is_explained(rng):
    with pytest.raises(InputError, match=r"expects 1 input channel\(s\) but the image has 3"):
        segment(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), tiny())


def test_tile_rank_must_match_model():
    with pytest.raises(InputError, match=r"tile_shape \(8, 8, 8\) has 3 axes but the model is 2D"):
        segment(
            np.arange(64.0).reshape(8, 8), tiny(), config=InferenceConfig(tile_shape=(8, 8, 8))
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):
    image = rng.random((3, 64, 64)).astype(np.float32)
    model = tiny()
    cpu = segment(
        image, model, config=InferenceConfig(device="cpu", precision="fp32"),
        return_probabilities=True,
    )  # fmt: skip
    gpu = segment(
        image, model, config=InferenceConfig(device="cuda", precision="fp32"),
        return_probabilities=True,
    )  # fmt: skip
    np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=1e-4)
    amp = segment(image, model, config=InferenceConfig(device="cuda", precision="fp16"))
    assert (amp.labels == cpu.labels).mean() > 0.99
