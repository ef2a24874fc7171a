import numpy as np
import pytest
from scipy import ndimage

from napari_segtool.active_learning import (
    SimulationConfig,
    held_out_units,
    iter_simulate,
    make_units,
    mc_dropout,
    score_units,
    select,
    voxel_uncertainty,
)
from napari_segtool.config import FinetuneConfig, InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.model import SegmentationModel
from napari_segtool.training import LabelledImage, iter_finetune
from tests.training.conftest import tiny_model

FAST = FinetuneConfig(epochs=2, steps_per_epoch=10, batch_size=4, learning_rate=1e-2,
                      device="cpu", patch_shape=(48, 48))  # fmt: skip


def easy_and_hard(n: int = 8, size: int = 64, seed: int = 0):
    """Even slices: bright blobs on a clean background; odd slices: faint blobs in noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for z in range(n):
        field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 4)
        lab = (field > np.percentile(field, 70)).astype(np.uint8)
        if z % 2 == 0:
            img = 40 + 160 * lab + rng.normal(0, 5, lab.shape)
        else:
            img = 110 + 20 * lab + rng.normal(0, 45, lab.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return np.stack(images), np.stack(labels)


@pytest.fixture(scope="module")
def trained():
    image, labels = easy_and_hard()
    mask = np.zeros(labels.shape, bool)
    mask[[0, 2]] = True  # trained on two easy slices only
    result = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, mask)],
                                config=FAST.replace(validation_fraction=0.0)))  # fmt: skip
    return image, labels, result.model


def test_uncertainty_picks_the_hard_slices(trained):
    image, labels, model = trained
    seg = segment(image, model, config=InferenceConfig(tta=True, device="cpu"))
    for kind in ("entropy", "disagreement", "combined"):
        unc = voxel_uncertainty(seg, kind=kind)
        assert unc.shape == labels.shape
        units = score_units(make_units(labels.shape), unc, seg.labels)
        picked = {u.index for u in select(units, 4, strategy="uncertainty", min_gap=1,
                                          min_foreground=0.0)}  # fmt: skip
        assert picked == {1, 3, 5, 7}, kind


def test_disagreement_is_the_share_of_dissenting_flips(trained):
    image, _, model = trained
    seg = segment(image[:2], model, config=InferenceConfig(tta=True, device="cpu"))
    assert seg.disagreement is not None
    values = np.unique(np.round(seg.disagreement, 5))
    assert values.min() >= 0.0
    assert values.max() <= 0.75 + 1e-6  # 4 flips in 2D: at most 3 of 4 dissent
    plain = segment(image[:2], model, config=InferenceConfig(device="cpu"))
    assert plain.disagreement is None
    with pytest.raises(InputError, match="flip TTA"):
        voxel_uncertainty(plain)


def test_mc_dropout_gives_entropy_and_bald():
    model = SegmentationModel.new(ModelConfig(depth=2, base_features=4, dropout=0.5),
                                  tile_shape=(32, 32))  # fmt: skip
    image = np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
    labels, entropy, bald = mc_dropout(
        image, model, passes=4, config=InferenceConfig(device="cpu")
    )
    assert labels.shape == entropy.shape == bald.shape == (32, 32)
    assert (bald >= 0).all()
    assert (bald <= entropy + 1e-6).all()
    assert bald.max() > 0  # dropout really varied the passes
    with pytest.raises(InputError, match="dropout > 0"):
        mc_dropout(image, tiny_model())


def test_simulate_end_to_end_on_a_tiny_stack():
    image, labels = easy_and_hard(n=10)
    cfg = SimulationConfig(strategy="uncertainty", initial=2, rounds=2, per_round=2,
                           finetune=FAST.replace(epochs=1, steps_per_epoch=4))  # fmt: skip
    held = set(held_out_units(make_units(labels.shape), cfg.held_out_fraction))
    curve = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=1))
    assert [p.n_revealed for p in curve] == [2, 4, 6]
    assert all(0.0 <= p.dice <= 1.0 for p in curve)
    revealed = curve[-1].revealed
    assert len(set(revealed)) == 6
    assert held.isdisjoint(revealed)
    again = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=1))
    assert [p.revealed for p in again] == [p.revealed for p in curve]


def test_simulate_with_sparse_label_ids_uses_the_real_class_count(tmp_path, capsys):
    """Issue 10 item 5: TotalSegmentator-style ids (here 117) train as 2 classes, not 118."""
    import json

    from napari_segtool.cli import main
    from napari_segtool.io import write_image

    image, labels = easy_and_hard(n=6)
    sparse = (labels > 0).astype(np.uint8) * 117
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", sparse)
    out = tmp_path / "sim.json"
    args = ["simulate", str(img), str(lab), "--rounds", "1", "--epochs", "1", "--device",
            "cpu", "--steps-per-epoch", "2", "--tile", "32", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["label_values"] == [0, 117]
    assert all(0.0 <= d <= 1.0 for _, d in result["mean"])


def test_finetune_config_refuses_non_finite_rates_and_negative_seeds():
    from napari_segtool.config import FinetuneConfig

    for bad in (float("nan"), float("inf"), 0.0, -1e-3):
        with pytest.raises(InputError, match="learning_rate"):
            FinetuneConfig(learning_rate=bad)
    with pytest.raises(InputError, match="seed"):
        FinetuneConfig(seed=-1)
