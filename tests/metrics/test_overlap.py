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


# -- issue 10 item 5: confusion counts over the classes that occur, not up to the largest id ---
def test_one_voxel_of_65535_costs_one_row_not_a_32_gib_table(monkeypatch):
    from napari_segtool.metrics import compact_confusion

    # with 64 MiB "available", a 65536 x 65536 table (32 GiB) would be refused outright
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 64 << 20)
    ref = np.zeros((3, 20, 20), np.uint16)
    ref[:, 5:15, 5:15] = 5
    pred = ref.copy()
    pred[0, 0, 0] = 65535
    ids, cm = compact_confusion(pred, ref)
    np.testing.assert_array_equal(ids, [0, 5, 65535])
    assert cm.shape == (3, 3)
    assert cm[0, 2] == 1  # reference background, predicted 65535
    result = evaluate(pred, ref, per_slice=True)
    assert set(result["per_class"]) == {5, 65535}
    assert result["per_class"][5]["dice"] == 1.0
    assert result["per_class"][65535]["dice"] == 0.0
    with pytest.raises(InputError, match=r"indexed up to label id 65535 .*compact_confusion"):
        confusion_matrix(pred, ref)


def test_sparse_ids_keep_their_numbers_and_match_a_dense_count():
    from napari_segtool.metrics import compact_confusion

    rng = np.random.default_rng(3)
    palette = np.array([0, 1, 5, 52, 117])  # TotalSegmentator-style ids
    ref = palette[rng.integers(0, 5, (4, 9, 11))].astype(np.uint8)
    pred = palette[rng.integers(0, 5, (4, 9, 11))].astype(np.uint8)
    ids, cm = compact_confusion(pred, ref)
    np.testing.assert_array_equal(ids, palette)
    dense = confusion_matrix(pred, ref)
    np.testing.assert_array_equal(cm, dense[np.ix_(palette, palette)])
    compact = overlap_metrics(confusion=cm, ids=ids)
    assert compact == overlap_metrics(confusion=dense)
    assert sorted(compact["per_class"]) == [1, 5, 52, 117]


def test_int64_ids_beyond_any_table_and_bool_masks():
    from napari_segtool.metrics import compact_confusion, label_ids

    big = np.array([0, 2**40, 2**40, 7], np.int64)
    ids, cm = compact_confusion(big, big)
    np.testing.assert_array_equal(ids, [0, 7, 2**40])
    np.testing.assert_array_equal(np.diag(cm), [1, 1, 2])
    np.testing.assert_array_equal(label_ids(np.array([True, False])), [0, 1])
    m = overlap_metrics(np.array([True, False, True]), np.array([True, True, False]))
    assert m["per_class"][1]["dice"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="above 2\\*\\*63"):
        compact_confusion(np.array([2**63], np.uint64), np.array([0], np.uint64))


def test_ids_must_name_the_rows():
    with pytest.raises(InputError, match="background 0 first"):
        overlap_metrics(confusion=np.eye(2, dtype=np.int64), ids=[3, 4])
