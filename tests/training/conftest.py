"""Small synthetic segmentation data that a tiny U-Net learns in a few dozen steps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_segtool.config import ModelConfig
from napari_segtool.model import SegmentationModel


def blobs(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright smooth blobs on a noisy background: (uint8 image, 0/1 labels)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=4)
    labels = (field > np.percentile(field, 70)).astype(np.uint8)
    image = 60 + 120 * labels + rng.normal(0, 25, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture
def stack() -> tuple[np.ndarray, np.ndarray]:
    return blobs((6, 64, 64))


def tiny_model(dims: int = 2, seed: int = 0) -> SegmentationModel:
    tile = (64, 64) if dims == 2 else (8, 32, 32)
    return SegmentationModel.new(
        ModelConfig(spatial_dims=dims, depth=2, base_features=4), tile_shape=tile, seed=seed
    )
