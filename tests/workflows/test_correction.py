"""The correction round as one core operation, on a tiny synthetic stack."""

import numpy as np
import pytest

from napari_segtool.config import FinetuneConfig, InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import Progress, segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.project import Project, ProjectState
from napari_segtool.model import SegmentationModel
from napari_segtool.training import EpochReport, StepProgress
from napari_segtool.workflows import (
    create_project,
    describe_project,
    iter_correction_round,
    iter_resegment,
    iter_train_round,
    merge_resegmentation,
    record_version,
)
from napari_segtool.workflows.projects import starting_model
from tests.training.conftest import blobs, tiny_model

FAST = FinetuneConfig(epochs=3, steps_per_epoch=10, batch_size=4, learning_rate=1e-2,
                      device="cpu", patch_shape=(48, 48))  # fmt: skip


@pytest.fixture
def corrected(tmp_path):
    """A saved project: a tiny model's prediction, three slices fixed and reviewed, a stroke."""
    image, truth = blobs((5, 64, 64))
    start = tiny_model()
    path = start.save(tmp_path / "start.pt")
    state = ProjectState.start(segment(image, start).labels, base_model=str(path))
    state.labels[:3] = truth[:3]
    state.reviewed = {0, 1, 2}
    state.labels[3, 10:20, 10:20] = 1 - state.labels[3, 10:20, 10:20]  # a correction
    state.painted[3, 10:20, 10:20] = True
    project = Project(tmp_path / "p.segtool")
    project.save(state)
    return project, image, truth


def _baseline_wins(monkeypatch):
    """Make the starting model score 1.0 on the held-out voxels, so no round promotes."""
    from napari_segtool.training import finetune

    real = finetune.masked_scores
    calls = []

    def scores(m, items, *, inference):
        dice, err = real(m, items, inference=inference)
        calls.append(dice)
        return (1.0 if len(calls) == 1 else min(dice, 0.5)), err

    monkeypatch.setattr(finetune, "masked_scores", scores)


def test_a_promoted_round_resegments_only_untouched_voxels_and_saves(corrected):
    project, image, _ = corrected
    state = project.load()
    protected = state.protected()
    kept = state.labels.copy()
    items = []
    gen = iter_correction_round(project, image, state, config=FAST)
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert {type(i) for i in items} == {StepProgress, EpochReport, Progress}
    assert result.version == 1
    assert result.promoted, result.summary()  # a trained model beats the random start
    assert result.val_dice > result.baseline_dice
    saved = Project(project.folder).load()
    assert saved.current_version == 1
    assert [v["version"] for v in saved.versions] == [1]
    # the untouched voxels hold the new model's output, every protected voxel is kept
    model = SegmentationModel.load(project.folder / "models" / "v0001.pt")
    fresh = segment(image, model, config=InferenceConfig(device="cpu", tta=True)).labels
    assert np.array_equal(saved.labels[protected], kept[protected])
    assert np.array_equal(saved.labels[~protected], fresh[~protected])
    assert np.array_equal(saved.machine[~protected], fresh[~protected])
    changed = int(np.count_nonzero(kept[~protected] != fresh[~protected]))
    assert result.resegmented == changed > 0
    assert result.summary()["resegmented_voxels"] == changed


def test_a_round_that_is_worse_is_kept_but_changes_no_label(corrected, monkeypatch):
    project, image, _ = corrected
    _baseline_wins(monkeypatch)
    before = project.load()
    result = run_to_end(iter_correction_round(project, image, project.load(), config=FAST))
    assert not result.promoted
    assert result.resegmented is None
    assert result.baseline_dice == 1.0
    saved = Project(project.folder).load()
    assert saved.current_version is None
    assert saved.versions[0]["promoted"] is False
    assert (project.folder / "models" / "v0001.pt").is_file()
    assert np.array_equal(saved.labels, before.labels)


def test_cancelling_mid_round_leaves_model_and_state_byte_identical(corrected):
    project, image, _ = corrected
    run_to_end(iter_correction_round(project, image, project.load(), config=FAST))
    model_file = project.folder / "models" / "v0001.pt"
    model_bytes = model_file.read_bytes()
    state_bytes = project.state_path.read_bytes()
    gen = iter_correction_round(project, image, project.load(), config=FAST)
    for _ in range(4):  # four steps into the first epoch
        assert isinstance(next(gen), StepProgress)
    gen.close()
    assert model_file.read_bytes() == model_bytes
    assert project.state_path.read_bytes() == state_bytes
    assert sorted(p.name for p in (project.folder / "models").iterdir()) == ["v0001.pt"]


def test_the_gui_path_records_on_a_snapshot_and_merges_into_the_live_state(corrected):
    """save=False: only the version is written; the caller re-segments and merges later."""
    project, image, _ = corrected
    live = project.load()
    snapshot = live.snapshot()
    result = run_to_end(iter_correction_round(project, image, snapshot, config=FAST,
                                              save=False))  # fmt: skip
    assert result.promoted
    assert result.resegmented is None
    on_disk = Project(project.folder).load()
    assert on_disk.current_version == 1
    assert np.array_equal(on_disk.labels, live.labels)  # labels on disk untouched
    live.labels[4, 30:34, 30:34] = 2  # painted while the round ran
    live.painted[4, 30:34, 30:34] = True
    live.versions, live.current_version = snapshot.versions, snapshot.current_version
    segmentation = run_to_end(iter_resegment(project, image, live, device="cpu"))
    assert segmentation.uncertainty.shape == image.shape
    assert 0 <= segmentation.uncertainty.min() <= segmentation.uncertainty.max() <= 1
    protected = live.protected()
    kept = live.labels.copy()
    changed = merge_resegmentation(live, segmentation)
    assert changed > 0
    assert (live.labels[4, 30:34, 30:34] == 2).all()
    assert np.array_equal(live.labels[protected], kept[protected])
    assert np.array_equal(live.labels[~protected], segmentation.labels[~protected])


def test_train_and_record_are_separate_steps_and_training_writes_nothing(corrected):
    project, image, _ = corrected
    state = project.load()
    before = project.state_path.read_bytes()
    trained = run_to_end(iter_train_round(project, image, state, config=FAST))
    assert project.state_path.read_bytes() == before
    assert not (project.folder / "models").exists()
    entry = record_version(project, state, trained)
    assert entry["version"] == 1
    assert entry["labelled_voxels"] == trained.result.labelled_voxels


def test_an_untrained_start_takes_the_classes_of_the_labels(tmp_path):
    image, truth = blobs((4, 64, 64))
    labels = (truth * 5).astype(np.uint8)  # an organ id, as in CT
    project = Project(tmp_path / "ct.segtool")
    create_project(project, labels=labels, image_shape=image.shape, reviewed=[0, 1, 2],
                   base_model="new-2d")  # fmt: skip
    cfg = FAST.replace(epochs=1, steps_per_epoch=2)
    trained = run_to_end(iter_train_round(project, image, project.load(), config=cfg))
    assert trained.classes.rebuilt
    assert trained.result.model.label_values == (0, 5)


def test_nothing_labelled_is_refused_before_training(tmp_path):
    image, truth = blobs((3, 32, 32))
    project = Project(tmp_path / "p")
    create_project(project, labels=truth, image_shape=image.shape, base_model="new-2d")
    with pytest.raises(InputError, match="no labelled voxels"):
        run_to_end(iter_correction_round(project, image, project.load(), config=FAST))
    assert not (project.folder / "models").exists()


def test_create_and_describe_a_project(tmp_path):
    image, truth = blobs((4, 32, 32))
    painted = np.zeros(truth.shape, bool)
    painted[3, :2, :5] = True
    project = Project(tmp_path / "p")
    create_project(project, labels=truth, image_shape=image.shape, painted=painted,
                   reviewed=[1, 2], base_model="new-2d",
                   image={"name": "blobs", "path": "/data/blobs.tif"})  # fmt: skip
    info = describe_project(project)
    assert info["versions"] == []
    assert info["current_version"] is None
    assert info["reviewed"] == [1, 2]
    assert info["painted_voxels"] == 10
    assert info["labelled_voxels"] == 2 * 32 * 32 + 10
    assert info["image"] == {"name": "blobs", "path": "/data/blobs.tif", "shape": [4, 32, 32]}
    with pytest.raises(InputError, match="already holds a project"):
        create_project(project, labels=truth, image_shape=image.shape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_shape": (4, 16, 16)}, "do not match the image"),
        ({"reviewed": [9]}, "outside 0..3"),
        ({"painted": np.ones((4, 8, 8), bool)}, "the mask"),
        ({"labels": np.zeros((4, 32, 32), np.float32)}, "integer image"),
    ],
)
def test_create_refuses_inconsistent_input(tmp_path, kwargs, message):
    args = {"labels": np.zeros((4, 32, 32), np.uint8), "image_shape": (4, 32, 32), **kwargs}
    project = Project(tmp_path / "p")
    with pytest.raises(InputError, match=message):
        create_project(project, **args)
    assert not project.exists()


def test_starting_model_names_stay_names_and_files_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model().save(tmp_path / "m.pt")
    assert starting_model("em-membranes-2d") == "em-membranes-2d"
    assert starting_model("m.pt") == str(tmp_path / "m.pt")
    with pytest.raises(InputError, match="neither a bundled model"):
        starting_model("no-such-model")
