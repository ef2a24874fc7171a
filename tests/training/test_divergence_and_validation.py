"""A run whose loss becomes NaN stops; a round with nothing to validate on is not promoted."""

import numpy as np
import pytest
import torch

from napari_segtool.config import FinetuneConfig, TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.training import LabelledImage, PatchSampler, iter_finetune, iter_train
from tests.training.conftest import blobs, tiny_model

FAST = FinetuneConfig(epochs=2, steps_per_epoch=5, batch_size=2, learning_rate=1e-2,
                      device="cpu", patch_shape=(32, 32))  # fmt: skip


def _sampler(image, labels, model):
    lo, hi = percentile_range(image, model.normalization)
    return PatchSampler([apply_range(image[np.newaxis], lo, hi, channel_axis=0)], [labels],
                        [None], (32, 32))  # fmt: skip


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_start_weights():
    image, labels = blobs((64, 64))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    cfg = TrainingConfig(patch_shape=(32, 32), batch_size=2, steps=20, steps_per_epoch=10,
                         learning_rate=1e30, device="cpu")  # fmt: skip
    with pytest.raises(InputError, match=r"training diverged: .* lower the learning rate"):
        run_to_end(iter_train(model, _sampler(image, labels, model), config=cfg))
    for k, v in model.network.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.history == []


def test_a_diverging_finetune_round_raises_instead_of_promoting_nan_weights():
    image, labels = blobs((4, 48, 48))
    start = tiny_model()
    with pytest.raises(InputError, match="training diverged"):
        run_to_end(iter_finetune(start, [LabelledImage(image, labels, None)],
                                 config=FAST.replace(learning_rate=1e30)))  # fmt: skip
    assert all(torch.isfinite(v).all() for v in start.network.state_dict().values()
               if v.is_floating_point())  # fmt: skip


def test_labels_beyond_the_model_are_refused_before_training():
    image, labels = blobs((64, 64))
    model = tiny_model()
    cfg = TrainingConfig(patch_shape=(32, 32), batch_size=2, steps=2, steps_per_epoch=1,
                         device="cpu")  # fmt: skip
    with pytest.raises(InputError, match="labels hold class 3 but the model has 2"):
        run_to_end(iter_train(model, _sampler(image, labels * 3, model), config=cfg))
    with pytest.raises(InputError, match="negative value -1"):
        run_to_end(iter_train(model, _sampler(image, labels.astype(np.int8) - 1, model),
                              config=cfg))  # fmt: skip


def test_one_small_ct_sized_slice_still_gets_validation():
    # a fully reviewed 101 x 122 slice (the CT sample's size) is one 128 px block
    image, labels = blobs((101, 122))
    result = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, None)],
                                      config=FAST))  # fmt: skip
    assert result.validation_voxels > 0
    assert result.baseline_dice is not None
    assert result.best_dice is not None
    assert "note" not in result.summary()


def test_a_round_with_nothing_to_validate_on_keeps_the_previous_model():
    image, labels = blobs((101, 122))
    mask = np.zeros(labels.shape, bool)
    mask[40:50, 60:70] = True  # one small corrected patch: nothing can be held out
    result = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, mask)],
                                      config=FAST))  # fmt: skip
    assert result.validation_voxels == 0
    assert not result.promote
    summary = result.summary()
    assert summary["promote"] is False
    assert "nothing to validate on" in summary["note"]
    # asking for no validation is the caller's choice: promoted, and said so
    chosen = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, mask)],
                                      config=FAST.replace(validation_fraction=0.0)))  # fmt: skip
    assert chosen.promote
    assert "without validation" in chosen.summary()["note"]
