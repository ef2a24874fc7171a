import numpy as np
import pytest
import torch

from napari_segtool.config import FinetuneConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.project import Project, ProjectState, merge_untouched
from napari_segtool.model import SegmentationModel
from napari_segtool.training import (
    EpochReport,
    LabelledImage,
    StepProgress,
    iter_finetune,
    labelled_mask,
    split_validation,
)
from napari_segtool.training.versions import (
    current_model,
    record_round,
    switch_version,
    training_data,
)
from tests.training.conftest import blobs, tiny_model

FAST = FinetuneConfig(epochs=3, steps_per_epoch=10, batch_size=4, learning_rate=1e-2,
                      device="cpu", patch_shape=(48, 48))  # fmt: skip


def test_labelled_mask_counts_changed_voxels_and_reviewed_slices():
    changed = np.zeros((4, 5, 5), bool)
    changed[1, 2, 2] = True
    mask = labelled_mask((4, 5, 5), changed=changed, reviewed={3})
    assert mask.sum(axis=(1, 2)).tolist() == [0, 1, 0, 25]
    assert labelled_mask((5, 5), reviewed=[0]).all()
    with pytest.raises(InputError, match="slice 7 is outside"):
        labelled_mask((4, 5, 5), reviewed=[7])


def test_split_holds_out_whole_slices_or_blocks_deterministically():
    mask = np.zeros((10, 32, 32), bool)
    mask[[1, 3, 4, 8]] = True
    train, val = split_validation(mask, fraction=0.25, seed=3)
    again = split_validation(mask, fraction=0.25, seed=3)
    assert np.array_equal(val, again[1])
    assert val.any(axis=(1, 2)).sum() == 1
    assert train.any(axis=(1, 2)).sum() == 3
    assert not (train & val).any()
    assert np.array_equal(train | val, mask)
    # one labelled 2D image: blocks; a single block: no validation
    img = np.ones((300, 300), bool)
    train2, val2 = split_validation(img, fraction=0.25, block=100)
    assert 0.1 < val2.mean() < 0.4
    assert np.array_equal(train2 | val2, img)
    # labels within one block: smaller blocks; within one 16 x 16 block: no validation
    one = np.zeros((300, 300), bool)
    one[:50, :50] = True
    train3, val3 = split_validation(one, fraction=0.5, block=100)
    assert val3.any()
    assert train3.any()
    assert np.array_equal(train3 | val3, one)
    one[:] = False
    one[:10, :10] = True
    assert not split_validation(one, fraction=0.5, block=100)[1].any()


def test_finetune_learns_from_partial_labels_and_leaves_the_start_untouched():
    image, labels = blobs((6, 64, 64))
    mask = labelled_mask(labels.shape, reviewed=[0, 2, 4, 5])
    start = tiny_model()
    before = {k: v.clone() for k, v in start.network.state_dict().items()}
    items = list(iter_finetune(start, [LabelledImage(image, labels, mask)], config=FAST))
    epochs = [i for i in items if isinstance(i, EpochReport)]
    steps = [i for i in items if isinstance(i, StepProgress)]
    assert len(steps) == 30
    assert 1 <= len(epochs) <= 3
    for k, v in start.network.state_dict().items():
        assert np.array_equal(v.numpy(), before[k].numpy())


def test_finetune_result_beats_untrained_start_on_held_out_slices():
    image, labels = blobs((6, 64, 64))
    mask = labelled_mask(labels.shape, reviewed=[0, 2, 4, 5])
    result = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, mask)],
                                config=FAST))  # fmt: skip
    assert result.validation_voxels == 64 * 64  # one of the four reviewed slices
    assert result.best_dice > result.baseline_dice
    assert result.best_dice > 0.7
    assert result.promote
    # the unlabelled slices 1 and 3 are segmented well too
    pred = segment(image[[1, 3]], result.model).labels
    inter = np.count_nonzero((pred == 1) & (labels[[1, 3]] == 1))
    assert 2 * inter / (np.count_nonzero(pred == 1) + np.count_nonzero(labels[[1, 3]])) > 0.7


def test_unlabelled_voxels_do_not_train():
    """Garbage labels outside the mask give the same run as clean ones."""
    image, labels = blobs((4, 64, 64))
    mask = labelled_mask(labels.shape, reviewed=[0, 1, 2])
    garbage = labels.copy()
    garbage[3] = 1 - garbage[3]
    cfg = FAST.replace(epochs=1, steps_per_epoch=3)
    a = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels, mask)], config=cfg))
    b = run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, garbage, mask)], config=cfg))
    for (k, va), vb in zip(a.model.network.state_dict().items(),
                           b.model.network.state_dict().values(), strict=True):  # fmt: skip
        assert np.array_equal(va.numpy(), vb.numpy()), k


def test_worse_result_is_not_promoted():
    image, labels = blobs((4, 64, 64))
    good = run_to_end(
        iter_finetune(tiny_model(), [LabelledImage(image, labels, None)], config=FAST)
    )
    # now "fine-tune" the good model with a learning rate that wrecks it
    wild = FAST.replace(epochs=1, steps_per_epoch=5, learning_rate=5.0)
    worse = run_to_end(
        iter_finetune(good.model, [LabelledImage(image, labels, None)], config=wild)
    )
    assert worse.best_dice < worse.baseline_dice
    assert not worse.promote


def test_bad_training_input_is_reported():
    image, labels = blobs((2, 32, 32))
    with pytest.raises(InputError, match="no labelled voxels"):
        run_to_end(
            iter_finetune(
                tiny_model(), [LabelledImage(image, labels, np.zeros_like(labels, bool))]
            )
        )
    with pytest.raises(InputError, match="class 5"):
        run_to_end(iter_finetune(tiny_model(), [LabelledImage(image, labels * 5, None)]))
    with pytest.raises(InputError, match="do not match"):
        LabelledImage(image, labels[:, :10])


def test_cancel_mid_epoch_keeps_the_model_file_byte_identical(tmp_path):
    image, labels = blobs((4, 64, 64))
    project = Project(tmp_path / "p")
    state = ProjectState.start(labels, base_model=str(tmp_path / "start.pt"))
    state.reviewed = {0, 1, 2}
    tiny_model().save(tmp_path / "start.pt")
    first = run_to_end(iter_finetune(current_model(project, state),
                               [LabelledImage(image, labels, None)], config=FAST))  # fmt: skip
    entry = record_round(project, state, first)
    model_file = project.folder / entry["file"]
    saved = model_file.read_bytes()
    state_bytes = project.state_path.read_bytes()
    start = current_model(project, state)
    gen = iter_finetune(start, [training_data(image, state)],
                        config=FAST.replace(steps_per_epoch=10))  # fmt: skip
    for _ in range(4):  # four steps into the first epoch
        assert isinstance(next(gen), StepProgress)
    gen.close()
    assert model_file.read_bytes() == saved
    # the model in use was not trained in place either: saving it again gives the same weights
    on_disk = SegmentationModel.load(model_file).network.state_dict()
    weights = start.network.state_dict()
    assert all(torch.equal(weights[k].cpu(), on_disk[k]) for k in on_disk)
    start.save(tmp_path / "again.pt")
    again = SegmentationModel.load(tmp_path / "again.pt").network.state_dict()
    assert all(torch.equal(again[k], on_disk[k]) for k in on_disk)
    assert project.state_path.read_bytes() == state_bytes
    assert sorted(p.name for p in (project.folder / "models").iterdir()) == ["v0001.pt"]


def test_versions_promote_switch_and_reload(tmp_path):
    image, labels = blobs((4, 64, 64))
    tiny_model().save(tmp_path / "start.pt")
    project = Project(tmp_path / "p")
    state = ProjectState.start(labels, base_model=str(tmp_path / "start.pt"))
    state.reviewed = {0, 1, 2, 3}
    r1 = run_to_end(iter_finetune(current_model(project, state), [training_data(image, state)],
                            config=FAST))  # fmt: skip
    v1 = record_round(project, state, r1)
    assert v1["promoted"]
    assert state.current_version == 1
    wild = FAST.replace(epochs=1, steps_per_epoch=5, learning_rate=5.0)
    r2 = run_to_end(iter_finetune(current_model(project, state), [training_data(image, state)],
                            config=wild))  # fmt: skip
    v2 = record_round(project, state, r2)
    assert not v2["promoted"]
    assert state.current_version == 1
    assert v2["parent"] == 1
    switch_version(project, state, 2)  # the user insists
    reopened = Project(project.folder).load()
    assert reopened.current_version == 2
    assert [v["version"] for v in reopened.versions] == [1, 2]
    m = current_model(project, reopened)
    assert isinstance(m, SegmentationModel)
    assert m.name.endswith("v2")
    switch_version(project, reopened, None)
    assert Project(project.folder).load().current_version is None


def test_resegment_after_finetune_leaves_corrected_and_reviewed_voxels(tmp_path):
    image, labels = blobs((5, 64, 64))
    start = tiny_model()
    state = ProjectState.start(segment(image, start).labels)
    state.labels[1, 10:20, 10:20] = labels[1, 10:20, 10:20]  # a correction
    state.painted[1, 10:20, 10:20] = True
    state.labels[2] = labels[2]  # a fully fixed slice, marked reviewed
    state.reviewed.add(2)
    state.reviewed.add(4)  # reviewed as it was
    protected = state.protected()
    kept = state.labels.copy()
    result = run_to_end(iter_finetune(start, [training_data(image, state)], config=FAST))
    n = merge_untouched(state, segment(image, result.model).labels)
    assert n > 0
    assert np.array_equal(state.labels[protected], kept[protected])
    assert np.array_equal(state.labels[4], kept[4])
    assert np.array_equal(state.labels[1, 10:20, 10:20], labels[1, 10:20, 10:20])
