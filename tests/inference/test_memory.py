"""Segmentation checks its peak memory against what is available (issue 10 item 5)."""

import numpy as np
import pytest

from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import segment
from napari_segtool.inference.predict import segment_memory
from napari_segtool.model import SegmentationModel


def test_estimate_counts_probabilities_and_tta():
    plain = segment_memory((10, 512, 512), spatial_dims=2, in_channels=1, n_classes=2)
    probs = segment_memory(
        (10, 512, 512), spatial_dims=2, in_channels=1, n_classes=2, return_probabilities=True
    )
    with_tta = InferenceConfig(tta=True)
    tta = segment_memory(
        (10, 512, 512), spatial_dims=2, in_channels=1, n_classes=2, config=with_tta
    )
    volume = 10 * 512 * 512
    assert probs - plain == 2 * 4 * volume  # two float32 probability maps
    assert tta - plain > 2 * 4 * volume  # uncertainty and disagreement maps, one more channel
    # a 2D model on a stack works a few slices at a time: far below 2 channels x volume x 4 B
    assert plain < volume * (1 + 2 * 4)


def test_segmentation_too_large_for_memory_is_refused_before_work(monkeypatch):
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 1 << 20)
    model = SegmentationModel.new(ModelConfig(base_features=4, depth=2), seed=0)
    image = np.random.default_rng(0).integers(0, 255, (256, 256)).astype(np.uint8)
    with pytest.raises(InputError) as info:
        segment(image, model, return_probabilities=True)
    message = str(info.value)
    assert "segmenting a 256 x 256 image needs" in message
    assert "1.0 MiB of memory is available" in message
    assert "crop" in message
    assert "larger-than-memory" in message


def test_ordinary_segmentation_passes_the_check(monkeypatch):
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 256 << 20)
    model = SegmentationModel.new(ModelConfig(base_features=4, depth=2), seed=0)
    image = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    assert segment(image, model).labels.shape == (64, 64)
