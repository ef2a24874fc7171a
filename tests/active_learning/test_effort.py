"""Effort in `simulate`: the voxels the shown prediction gets wrong in each revealed unit, plus
a review cost per unit (issue 16 item 1)."""

import json

import numpy as np

from napari_segtool.active_learning import SimulationConfig, iter_simulate, make_units
from napari_segtool.active_learning.simulate import unit_effort
from napari_segtool.config import InferenceConfig
from napari_segtool.inference import segment
from napari_segtool.inference.tiling import run_to_end
from tests.active_learning.test_uncertainty import FAST, easy_and_hard
from tests.training.conftest import tiny_model


def test_effort_counts_wrong_voxels_and_a_review_cost_per_unit():
    truth = np.zeros((3, 4, 5), np.uint8)
    truth[0, 1:3, 1:4] = 1  # 6 foreground voxels on slice 0
    truth[2, :, :] = 2
    shown = np.zeros_like(truth)  # the model shows background everywhere
    units = make_units(truth.shape)
    assert unit_effort(units[:1], shown, truth, 0.0) == 6
    assert unit_effort(units[1:2], shown, truth, 0.0) == 0  # right already: nothing to do
    assert unit_effort(units[2:], shown, truth, 0.0) == 20
    assert unit_effort(units, shown, truth, 0.5) == 6 + 20 + 3 * 10  # 10 per 20-voxel slice
    assert unit_effort(units, truth, truth, 0.0) == 0


def test_the_first_rounds_effort_is_the_starting_models_errors_in_the_initial_units():
    image, labels = easy_and_hard(n=10)
    cfg = SimulationConfig(strategy="random", initial=2, rounds=2, per_round=2,
                           review_fraction=0.01,
                           finetune=FAST.replace(epochs=1, steps_per_epoch=4))  # fmt: skip
    curve = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=3))
    shown = segment(image, tiny_model(), config=InferenceConfig(device="cpu")).labels
    units = {u.index: u for u in make_units(labels.shape)}
    first = [units[i] for i in curve[0].revealed]
    assert curve[0].effort == unit_effort(first, shown, labels, 0.01)
    assert curve[0].effort > 2 * round(0.01 * 64 * 64)  # an untrained model gets voxels wrong
    steps = np.diff([p.effort for p in curve])
    assert (steps >= 2 * round(0.01 * 64 * 64)).all()  # each round: at least the reviews
    again = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=3))
    assert [(p.revealed, p.effort, p.dice) for p in again] == [
        (p.revealed, p.effort, p.dice) for p in curve
    ]


def test_simulate_json_has_effort_curves_and_their_mean(tmp_path):
    from napari_segtool.cli import main
    from napari_segtool.io import write_image

    image, labels = easy_and_hard(n=8)
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    out = tmp_path / "sim.json"
    args = ["simulate", str(img), str(lab), "--rounds", "1", "--epochs", "1", "--device",
            "cpu", "--steps-per-epoch", "2", "--seeds", "2", "--strategy", "random",
            "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert [n for n, _ in result["mean"]] == [2, 4]
    for seed in result["seeds"]:
        assert [d for _, d in seed["effort_curve"]] == [d for _, d in seed["curve"]]
        assert seed["effort_curve"][1][0] > seed["effort_curve"][0][0] > 0
    for i, (voxels, dice) in enumerate(result["mean_effort"]):
        assert voxels == np.mean([s["effort_curve"][i][0] for s in result["seeds"]])
        assert dice == result["mean"][i][1]
    assert result["review_fraction"] == 0.01
