import numpy as np
import pytest
import torch

from napari_segtool.config import ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.model import SegmentationModel
from napari_segtool.model.classes import extend_classes, with_label_values


def _model(seed=0):
    return SegmentationModel.new(ModelConfig(depth=2, base_features=4), tile_shape=(32, 32),
                                 seed=seed)  # fmt: skip


def test_extending_keeps_what_the_model_knew(tmp_path):
    model = _model()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model.network.eval()(x)
    grown = extend_classes(model, (5, 117))
    assert grown.label_values == (0, 1, 5, 117)
    assert grown.config.out_channels == 4
    assert grown.class_names[-2:] == ("class 5", "class 117")
    with torch.inference_mode():
        after = grown.network.eval()(x)
    torch.testing.assert_close(after[:, :2], before)  # same logits for the known classes
    assert (after.argmax(1) < 2).all()  # the new classes are not predicted before training
    assert model.config.out_channels == 2  # the original is untouched
    loaded = SegmentationModel.load(grown.save(tmp_path / "grown.pt"))
    assert loaded.label_values == (0, 1, 5, 117)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.network.eval()(x), after)


def test_extending_refuses_known_or_bad_values():
    model = _model()
    with pytest.raises(InputError, match="already has"):
        extend_classes(model, (1,))
    with pytest.raises(InputError, match=">= 0"):
        extend_classes(model, (-3,))


def test_new_model_takes_the_labels_classes():
    fresh = with_label_values(_model(), (117, 0, 5))
    assert fresh.label_values == (0, 5, 117)
    assert fresh.config.out_channels == 3
    assert fresh.tile_shape == (32, 32)
    with pytest.raises(InputError, match="background"):
        with_label_values(_model(), (3, 4))
    assert np.isfinite(fresh.network(torch.zeros(1, 1, 32, 32)).detach().numpy()).all()
