import numpy as np
import pytest

from napari_segtool.config import TrainingConfig
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.model import SegmentationModel
from napari_segtool.training import EpochReport, PatchSampler, StepProgress, iter_train
from tests.training.conftest import blobs, tiny_model


def _sampler(image, labels, model):
    lo, hi = percentile_range(image, model.normalization)
    norm = apply_range(image[np.newaxis], lo, hi, channel_axis=0)
    return PatchSampler([norm], [labels], [None], (48, 48))


def _epochs(gen):
    return [r for r in gen if isinstance(r, EpochReport)]


def test_short_real_run_loss_falls_and_validation_improves():
    image, labels = blobs((128, 128))
    val_image, val_labels = blobs((96, 96), seed=1)
    model = tiny_model()
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=4, steps=60, steps_per_epoch=20,
                         learning_rate=1e-2, device="cpu")  # fmt: skip
    reports = _epochs(iter_train(model, _sampler(image, labels, model), config=cfg,
                                 validation=[(val_image, val_labels)]))  # fmt: skip
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert reports[-1].train_loss < 0.6 * reports[0].train_loss
    assert max(r.val_dice for r in reports) > 0.8
    assert len(model.history) == 3


def test_step_progress_is_yielded_between_epochs():
    image, labels = blobs((64, 64))
    model = tiny_model()
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=2, steps=6, steps_per_epoch=3,
                         device="cpu")  # fmt: skip
    items = list(iter_train(model, _sampler(image, labels, model), config=cfg,
                            progress_every=1))  # fmt: skip
    kinds = ["s" if isinstance(i, StepProgress) else "e" for i in items]
    assert kinds == ["s", "s", "s", "e", "s", "s", "s", "e"]
    assert [i.step for i in items if isinstance(i, StepProgress)] == [1, 2, 3, 4, 5, 6]


def test_resume_continues_epoch_count_and_schedule(tmp_path):
    image, labels = blobs((64, 64))
    model = tiny_model()
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=2, steps=8, steps_per_epoch=2,
                         device="cpu")  # fmt: skip
    gen = iter_train(model, _sampler(image, labels, model), config=cfg)
    first = [next(gen), next(gen)]
    gen.close()  # cancelled after epoch 2 of 4
    assert [r.epoch for r in first] == [1, 2]
    path = model.save(tmp_path / "m.pt")
    loaded = SegmentationModel.load(path)
    assert loaded.training_state["epoch"] == 2
    assert loaded.training_state["step"] == 4
    rest = _epochs(iter_train(loaded, _sampler(image, labels, loaded), config=cfg, resume=True))
    assert [r.epoch for r in rest] == [3, 4]
    assert [r.step for r in rest] == [6, 8]
    # the learning rate continues the cosine schedule instead of restarting at the peak
    assert rest[0].learning_rate < first[-1].learning_rate
    assert [h["epoch"] for h in loaded.history] == [1, 2, 3, 4]


def test_patience_stops_early_and_keeps_the_best_epoch():
    image, labels = blobs((64, 64))
    model = tiny_model()
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=2, steps=20, steps_per_epoch=2,
                         device="cpu")  # fmt: skip
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9, 0.9])
    weights = []

    def validate(m):
        weights.append({k: v.clone() for k, v in m.network.state_dict().items()})
        return next(scores), 0.1

    reports = _epochs(iter_train(model, _sampler(image, labels, model), config=cfg,
                                 validate=validate, patience=3))  # fmt: skip
    assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]
    assert [r.best for r in reports] == [True, True, False, False, False]
    for k, v in model.network.state_dict().items():
        assert np.array_equal(v.numpy(), weights[1][k].numpy()), k


@pytest.mark.parametrize("dims", [2, 3])
def test_sampler_patches_stay_inside_valid_voxels(dims):
    shape = (40, 40) if dims == 2 else (10, 40, 40)
    image, labels = blobs(shape)
    valid = np.zeros(shape, bool)
    valid[..., 10:20, 5:30] = True
    patch = (16, 16) if dims == 2 else (4, 16, 16)
    sampler = PatchSampler([image[np.newaxis].astype(np.float32)], [labels], [valid], patch)
    x, y, v = sampler.sample(16, np.random.default_rng(0))
    assert x.shape == (16, 1, *patch)
    assert y.shape == (16, *patch)
    assert v.any(axis=tuple(range(1, v.ndim))).all()  # every patch holds labelled voxels
