import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.training import LabelledImage
from napari_segtool.training.classes import fit_classes
from tests.training.conftest import tiny_model


def _data(values=(5,)):
    image = np.zeros((16, 16), np.uint8)
    labels = np.zeros((16, 16), np.uint8)
    for i, v in enumerate(values):
        labels[2 * i : 2 * i + 2, :4] = v
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    labels[12, 12] = 200  # outside the mask: never counts
    return [LabelledImage(image, labels, mask)]


def test_untrained_model_is_rebuilt_with_the_classes_present_and_the_references():
    reference = np.zeros((16, 16), np.uint8)
    reference[0, 0] = 9
    fit = fit_classes(tiny_model(), _data((5,)), untrained=True, also=[reference])
    assert fit.rebuilt
    assert fit.model.label_values == (0, 5, 9)
    assert "3 classes" in fit.describe()


def test_trained_model_grows_only_the_missing_classes():
    fit = fit_classes(tiny_model(), _data((1, 5)), untrained=False)
    assert fit.added == (5,)
    assert fit.model.label_values == (0, 1, 5)
    same = fit_classes(tiny_model(), _data((1,)), untrained=False)
    assert same.added == ()
    assert same.model.label_values == (0, 1)


def test_without_extend_a_new_class_is_a_clear_error():
    with pytest.raises(InputError, match=r"classes \[5\]"):
        fit_classes(tiny_model(), _data((5,)), untrained=False, extend=False)
