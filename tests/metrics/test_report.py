"""The metric table and the one Dice: every front end reads the same names and numbers."""

import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.metrics import (
    DISTANCE_KEYS,
    METRIC,
    METRICS,
    SUMMARY_KEYS,
    ConfusionTracker,
    evaluate,
    foreground_dice,
    macro_dice,
    overlap_metrics,
    slice_confusion,
)
from napari_segtool.metrics.overlap import OVERLAP_KEYS


def test_the_table_names_what_evaluate_returns_in_order():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 3, (2, 3, 9, 9))
    result = evaluate(pred, ref, spacing=(2.0, 1.0, 1.0))
    assert tuple(result)[: len(METRICS)] == SUMMARY_KEYS
    assert set(OVERLAP_KEYS) < set(SUMMARY_KEYS)
    assert DISTANCE_KEYS == ("hd", "hd95", "assd")
    assert all(METRIC[k].needs_spacing for k in DISTANCE_KEYS)
    assert not any(METRIC[k].needs_spacing for k in OVERLAP_KEYS)
    assert {m.better for m in METRICS} == {"higher", "lower", "zero"}
    assert METRIC["rvd"].better == "zero"
    assert METRIC["voe"].better == "lower"
    no_distances = evaluate(pred, ref, distances=False)
    assert [METRIC[k].format(no_distances[k]) for k in DISTANCE_KEYS] == ["-", "-", "-"]


@pytest.mark.parametrize(
    ("value", "text"), [(0.123456, "0.1235"), (float("inf"), "inf"), (None, "-"), (3, "3")]
)
def test_formatter(value, text):
    assert METRIC["dice"].format(value) == text


def test_one_dice_everywhere():
    rng = np.random.default_rng(2)
    pred, ref = rng.integers(0, 4, (2, 6, 11, 13))
    pred[2] = ref[2] = 0  # a slice with no foreground at all: Dice 1
    pred[3][pred[3] == 2] = 0
    ref[3][ref[3] == 2] = 0  # class 2 absent from both in one slice: left out of its mean
    per_slice = slice_confusion(pred, ref, 4)
    expected = [overlap_metrics(confusion=c)["dice"] for c in per_slice]
    np.testing.assert_allclose(macro_dice(per_slice), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ConfusionTracker(pred, ref).slice_dice(), expected, atol=1e-12)
    assert macro_dice(per_slice)[2] == 1.0
    for z in range(6):
        assert foreground_dice(pred[z], ref[z], 4) == pytest.approx(expected[z], abs=1e-12)
    assert foreground_dice(pred, ref, 4) == pytest.approx(evaluate(pred, ref)["dice"])


def test_foreground_dice_refuses_values_beyond_its_classes():
    with pytest.raises(InputError, match="class 5 but n_classes is 3"):
        foreground_dice(np.array([0, 5]), np.array([0, 1]), 3)
