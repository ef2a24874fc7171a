import math

import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.metrics import class_metrics, confusion_matrix, evaluate, overlap_metrics

PRED = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
REF = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])


def test_hand_computed_binary_case():
    # TP 2, FP 2, FN 2, TN 6
    m = overlap_metrics(PRED, REF)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(6 / 8)
    assert m["voe"] == pytest.approx(2 / 3)
    assert m["rvd"] == pytest.approx(0.0)
    assert m["pixel_accuracy"] == pytest.approx(8 / 12)
    # class 0 recall 6/8, class 1 recall 2/4
    assert m["mean_pixel_accuracy"] == pytest.approx((6 / 8 + 2 / 4) / 2)


def test_rvd_is_signed():
    big = np.zeros((4, 4), int)
    big[:, :3] = 1
    small = np.zeros((4, 4), int)
    small[:, :2] = 1
    assert overlap_metrics(big, small)["rvd"] == pytest.approx(0.5)  # over-segmentation
    assert overlap_metrics(small, big)["rvd"] == pytest.approx(-1 / 3)


def test_multiclass_macro_mean_and_per_class():
    ref = np.array([0, 1, 1, 2, 2, 2, 3])
    pred = np.array([0, 1, 2, 2, 2, 2, 0])
    m = overlap_metrics(pred, ref)
    d1, d2, d3 = 2 * 1 / (1 + 2), 2 * 3 / (4 + 3), 0.0
    assert m["per_class"][1]["dice"] == pytest.approx(d1)
    assert m["per_class"][2]["dice"] == pytest.approx(d2)
    assert m["per_class"][3]["dice"] == pytest.approx(d3)
    assert m["dice"] == pytest.approx((d1 + d2 + d3) / 3)
    np.testing.assert_array_equal(
        confusion_matrix(pred, ref),
        [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 3, 0], [1, 0, 0, 0]],
    )


def test_empty_mask_policy():
    both = class_metrics(tp=0, fp=0, fn=0, tn=9)
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                    "specificity": 1.0, "voe": 0.0, "rvd": 0.0}  # fmt: skip
    ref_empty = class_metrics(tp=0, fp=3, fn=0, tn=6)
    assert (ref_empty["dice"], ref_empty["precision"], ref_empty["recall"]) == (0.0, 0.0, 1.0)
    assert math.isinf(ref_empty["rvd"])
    pred_empty = class_metrics(tp=0, fp=0, fn=3, tn=6)
    assert (pred_empty["dice"], pred_empty["precision"], pred_empty["recall"]) == (0.0, 1.0, 0.0)
    assert pred_empty["rvd"] == -1.0
    assert class_metrics(tp=4, fp=0, fn=0, tn=0)["specificity"] == 1.0


def test_no_foreground_anywhere_is_perfect():
    z = np.zeros((3, 3), np.uint8)
    m = evaluate(z, z)
    assert m["dice"] == 1.0
    assert m["hd95"] == 0.0
    assert m["per_class"] == {}


def test_classes_absent_from_both_are_left_out_of_the_mean():
    ref = np.array([0, 1, 1, 3])
    pred = np.array([0, 1, 1, 0])
    m = overlap_metrics(pred, ref)
    assert set(m["per_class"]) == {1, 3}  # class 2 is in neither


def test_inputs_not_mutated_and_validated():
    p, r = PRED.copy(), REF.copy()
    evaluate(p, r, spacing=(2.0, 1.0))
    np.testing.assert_array_equal(p, PRED)
    np.testing.assert_array_equal(r, REF)
    with pytest.raises(InputError, match="differ in shape"):
        evaluate(PRED, REF[:2])
    with pytest.raises(InputError, match="integer or boolean"):
        evaluate(PRED.astype(float), REF)
    with pytest.raises(InputError, match="negative"):
        evaluate(PRED - 1, REF)


def test_per_slice_matches_each_slice():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (4, 10, 12))
    ref = rng.integers(0, 3, (4, 10, 12))
    m = evaluate(pred, ref, distances=False, per_slice=True)
    for z, entry in enumerate(m["per_slice"]):
        own = overlap_metrics(pred[z], ref[z])
        assert entry["dice"] == pytest.approx(own["dice"])
        assert entry["pixel_accuracy"] == pytest.approx(own["pixel_accuracy"])
