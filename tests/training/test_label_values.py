"""Label values <-> channels: sparse ids train as their real class count and come back out."""

import numpy as np
import pytest

from napari_segtool.config import FinetuneConfig, InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.model import SegmentationModel
from napari_segtool.training import LabelledImage, iter_finetune
from napari_segtool.training.data import label_values_present, labels_to_channels
from napari_segtool.training.loop import validation_scores
from tests.training.conftest import blobs

FAST = FinetuneConfig(epochs=3, steps_per_epoch=10, batch_size=4, learning_rate=1e-2,
                      device="cpu", patch_shape=(48, 48))  # fmt: skip


def _sparse(shape=(6, 64, 64)):
    """Two foreground classes with TotalSegmentator-like ids 5 and 117."""
    image, mask = blobs(shape)
    labels = np.where(mask == 1, 5, 0).astype(np.uint16)
    right = np.zeros(shape, bool)
    right[..., shape[-1] // 2 :] = True
    labels[(mask == 1) & right] = 117
    image = image.astype(np.float32)
    image[(mask == 1) & right] += 60  # class 117 is brighter
    return image, labels


def test_label_values_present_is_compact_and_bounded():
    one = np.zeros((20, 20), np.uint16)
    one[3, 4] = 65535
    assert label_values_present(one) == (0, 65535)  # 2 classes, not 65536
    masked = np.array([[0, 7], [9, 3]], np.uint8)
    assert label_values_present(masked, mask=masked != 9) == (0, 3, 7)
    with pytest.raises(InputError, match=r"300 distinct values .* at most 256"):
        label_values_present(np.arange(300, dtype=np.uint16))
    with pytest.raises(InputError, match="negative value -1"):
        label_values_present(np.array([0, -1, 2]))


def test_labels_to_channels_maps_and_names_unknown_values():
    labels = np.array([[0, 117], [5, 40]], np.uint16)
    got = labels_to_channels(labels, (0, 5, 117), mask=labels != 40)
    assert got.tolist() == [[0, 2], [1, 0]]
    with pytest.raises(InputError, match=r"class 40, which the model does not have .*0, 5, 117"):
        labels_to_channels(labels, (0, 5, 117))
    identity = np.array([0, 1, 1], np.uint8)
    assert labels_to_channels(identity, (0, 1)) is identity  # no copy for 0..C-1
    with pytest.raises(InputError, match="negative value -3"):
        labels_to_channels(np.array([0, -3]), (0, 1))


def test_sparse_ids_train_as_three_classes_and_segment_to_the_same_ids():
    image, labels = _sparse()
    values = label_values_present(labels)
    assert values == (0, 5, 117)
    model = SegmentationModel.new(
        ModelConfig(depth=2, base_features=8, out_channels=len(values)),
        tile_shape=(64, 64),
        label_values=values,
    )
    result = run_to_end(iter_finetune(model, [LabelledImage(image, labels, None)],
                                      config=FAST.replace(epochs=4)))  # fmt: skip
    assert result.model.config.out_channels == 3
    assert result.model.label_values == (0, 5, 117)
    assert result.validation_voxels > 0
    assert result.best_dice > 0.5
    pred = segment(image, result.model, config=InferenceConfig(device="cpu")).labels
    assert set(np.unique(pred).tolist()) <= {0, 5, 117}
    assert 117 in pred
    # the loop's own evaluation reads label values too
    dice, err = validation_scores(
        result.model, [(image[0], labels[0])], inference=InferenceConfig()
    )
    assert dice > 0.5
    assert err < 0.2


def test_segment_writes_label_values_beyond_uint8():
    model = SegmentationModel.new(ModelConfig(depth=2, base_features=4), tile_shape=(32, 32),
                                  label_values=(0, 300))  # fmt: skip
    pred = segment(np.random.default_rng(0).random((40, 40)), model).labels
    assert pred.dtype == np.uint16
    assert set(np.unique(pred).tolist()) <= {0, 300}


def test_labels_the_model_does_not_know_or_negative_are_clear_errors():
    image, labels = _sparse((2, 32, 32))
    model = SegmentationModel.new(ModelConfig(depth=2, base_features=4, out_channels=2),
                                  tile_shape=(32, 32), label_values=(0, 5))  # fmt: skip
    with pytest.raises(InputError, match=r"class 117, which the model does not have .*\[0, 5\]"):
        run_to_end(iter_finetune(model, [LabelledImage(image, labels, None)], config=FAST))
    negative = np.where(labels == 117, -1, labels).astype(np.int16)
    with pytest.raises(InputError, match="negative value -1"):
        run_to_end(iter_finetune(model, [LabelledImage(image, negative, None)], config=FAST))
    # a negative value where labels do not count is ignored, as any other value there
    mask = negative >= 0
    short = FAST.replace(epochs=1, steps_per_epoch=2)
    result = run_to_end(iter_finetune(model, [LabelledImage(image, negative, mask)], config=short))
    assert result.labelled_voxels == int(mask.sum())
