"""Rare foreground in a round: the plan, class-balanced centres, a split that validates on it."""

import numpy as np
import pytest

from napari_segtool.config import FinetuneConfig
from napari_segtool.errors import InputError
from napari_segtool.training.balance import MAX_STEP_FACTOR, class_counts, plan_round
from napari_segtool.training.data import PatchSampler
from napari_segtool.training.split import split_validation


def test_the_plan_grows_with_rarity_and_is_plain_for_common_classes():
    common = plan_round(np.array([800, 200]), steps_per_epoch=15, balance="auto")
    assert (common.steps_per_epoch, common.foreground_fraction) == (15, 0.5)
    assert common.class_weights is None
    one_pct = plan_round(np.array([9_900, 100]), steps_per_epoch=15, balance="auto")
    rare = plan_round(np.array([99_900, 100]), steps_per_epoch=15, balance="auto")
    assert 15 < one_pct.steps_per_epoch < rare.steps_per_epoch == 15 * MAX_STEP_FACTOR
    assert 0.5 < one_pct.foreground_fraction < rare.foreground_fraction == pytest.approx(0.9)
    assert rare.class_weights[0] == 1.0
    assert rare.class_weights[1] > one_pct.class_weights[1] > 1.0
    # the rarest of several classes sets the plan; every present class is weighted
    multi = plan_round(np.array([90_000, 9_900, 100, 0]), steps_per_epoch=10, balance="auto")
    assert multi.class_balanced
    assert multi.class_weights[3] == 1.0  # absent: not weighted
    assert multi.class_weights[2] > multi.class_weights[1] > 1.0
    assert "0.1 %" in multi.reason


def test_off_and_no_foreground_are_plain_rounds():
    off = plan_round(np.array([99_900, 100]), steps_per_epoch=15, balance="off")
    none = plan_round(np.array([1000, 0]), steps_per_epoch=15, balance="auto")
    for plan in (off, none):
        assert (plan.steps_per_epoch, plan.foreground_fraction) == (15, 0.5)
        assert plan.class_weights is None
    with pytest.raises(InputError, match="balance"):
        FinetuneConfig(balance="more")


def test_class_counts_only_count_training_voxels():
    lab = np.array([[0, 1, 2], [2, 2, 0]])
    mask = np.array([[True, True, False], [True, True, True]])
    assert class_counts([lab], [mask], 3).tolist() == [2, 1, 2]


def test_class_balanced_centres_visit_a_rare_class_as_often_as_a_common_one():
    lab = np.zeros((64, 64), np.int64)
    lab[:32] = 1  # common: 2,048 voxels
    lab[60, 60] = 2  # rare: one voxel
    image = np.zeros((1, 64, 64), np.float32)

    def centre_classes(balanced):
        sampler = PatchSampler([image], [lab], [None], (1, 1), foreground_fraction=1.0,
                               class_balanced=balanced)  # fmt: skip
        rng = np.random.default_rng(0)
        got = [int(sampler.sample(1, rng, augment_patches=False)[1][0, 0, 0]) for _ in range(400)]
        return np.bincount(got, minlength=3)

    plain, balanced = centre_classes(False), centre_classes(True)
    assert plain[2] < 5  # about 1 in 2,049
    assert 150 < balanced[2] < 250
    assert 150 < balanced[1] < 250


def test_the_split_validates_on_foreground_slices_when_labels_say_where_it_is():
    mask = np.ones((10, 8, 8), bool)
    labels = np.zeros((10, 8, 8), np.int64)
    labels[[3, 7], 2:4, 2:4] = 1  # foreground on two slices of ten
    for seed in range(20):
        train, val = split_validation(mask, fraction=0.25, seed=seed, labels=labels)
        val_slices = set(np.flatnonzero(val.any(axis=(1, 2))).tolist())
        assert len(val_slices & {3, 7}) == 1  # one foreground slice validates, one trains
        assert not (train & val).any()
        assert ((train | val) == mask).all()
    blind = [split_validation(mask, fraction=0.25, seed=s)[1] for s in range(20)]
    assert any(not v[[3, 7]].any() for v in blind)  # without labels it often misses both
