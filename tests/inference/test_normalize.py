"""Normalisation keeps huge and extreme intensities usable, or refuses them (issue 10 item 9)."""

import numpy as np
import pytest

from napari_segtool.config import NormalizationConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.normalize import apply_range, check_range, percentile_range

NORM = NormalizationConfig()


def _noise(shape=(40, 50), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape)


def test_uint64_near_2_64_gives_an_error_not_an_overflow():
    image = _noise().astype(np.uint64) + np.uint64(2**64 - 1000)
    with pytest.raises(InputError, match=r"differ by too little.*subtract an offset"):
        percentile_range(image, NORM)


def test_uint64_over_its_full_range_is_normalised():
    image = _noise().astype(np.uint64) * np.uint64(2**56)
    lo, hi = percentile_range(image, NORM)
    out = apply_range(image, lo, hi)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() < 0.05
    assert out.max() > 0.95


def test_int64_near_minus_2_62_is_refused_instead_of_all_background():
    image = (-(2**62) + _noise()).astype(np.int64)
    with pytest.raises(InputError, match="differ by too little"):
        percentile_range(image, NORM)


def test_float64_up_to_1e300_is_normalised_in_float64():
    base = _noise().astype(np.float64)
    lo0, hi0 = percentile_range(base, NORM)
    scaled = base * 1e298  # up to 2.55e300: float32 would make it all infinity
    lo, hi = percentile_range(scaled, NORM)
    np.testing.assert_allclose(lo, lo0 * 1e298)
    np.testing.assert_allclose(
        apply_range(scaled, lo, hi), apply_range(base, lo0, hi0), rtol=1e-6, atol=1e-6
    )


def test_float64_outlier_beyond_float32_is_refused():
    image = _noise().astype(np.float64)
    image[0, 0] = 1e300
    with pytest.raises(InputError, match=r"overflow float32 .*numpy\.clip"):
        percentile_range(image, NORM)


def test_apply_range_refuses_a_value_range_that_overflows():
    image = np.array([[0.0, 1e300]])
    with pytest.raises(InputError, match="non-finite"):
        apply_range(image, np.array([0.0]), np.array([1.0]))


def test_check_range_accepts_ordinary_images():
    check_range(0.0, 65535.0, 100.0, 4000.0)
    check_range(-1024.0, 3071.0, -1000.0, 1500.0)  # CT Hounsfield units


@pytest.mark.parametrize("channel_axis", [0, 2])
def test_apply_range_per_channel_and_in_blocks(channel_axis):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 1000, (3, 70, 4)).astype(np.uint16)
    if channel_axis == 2:
        image = np.ascontiguousarray(np.moveaxis(image, 0, 2))
    lo = np.array([10.0, 20.0, 30.0])
    hi = np.array([900.0, 800.0, 700.0])
    out = apply_range(image, lo, hi, channel_axis=channel_axis)
    shape = [1, 1, 1]
    shape[channel_axis] = 3
    expected = (image - lo.reshape(shape)) / (hi - lo).reshape(shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
