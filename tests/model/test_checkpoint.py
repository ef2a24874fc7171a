import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from napari_segtool.config import ModelConfig, NormalizationConfig
from napari_segtool.errors import CheckpointError
from napari_segtool.model import SegmentationModel, UNet, list_models, load_model
from napari_segtool.model.bundled import WEIGHTS_DIR
from napari_segtool.model.checkpoint import FORMAT_VERSION, weights_digest


@pytest.fixture
def model():
    m = SegmentationModel.new(
        ModelConfig(spatial_dims=2, depth=3, base_features=4, out_channels=3),
        class_names=("bg", "a", "b"),
        tile_shape=(64, 64),
        seed=3,
        name="tiny",
    )
    m.normalization = NormalizationConfig(lower=2.0, upper=98.0)
    m.trained_on = {"dataset": "synthetic", "slices": [0, 1]}
    m.history = [{"epoch": 1, "train_loss": 0.5}]
    return m


@pytest.mark.parametrize("dims", [2, 3])
def test_round_trip_restores_everything(tmp_path, dims):
    cfg = ModelConfig(spatial_dims=dims, depth=2, base_features=4)
    m = SegmentationModel.new(cfg, tile_shape=(32, 32) if dims == 2 else (8, 16, 16), seed=1)
    # make running statistics non-trivial so the round trip must carry buffers too
    m.network.train()
    m.network(torch.randn(2, 1, *m.tile_shape))
    m.network.eval()
    path = m.save(tmp_path / "m.pt")
    back = SegmentationModel.load(path)
    assert back.config == cfg
    assert back.spatial_dims == dims
    x = torch.randn(1, 1, *m.tile_shape)
    with torch.inference_mode():
        torch.testing.assert_close(back.network(x), m.network(x))


def test_round_trip_metadata(tmp_path, model):
    back = SegmentationModel.load(model.save(tmp_path / "m.pt"))
    assert back.class_names == ("bg", "a", "b")
    assert back.tile_shape == (64, 64)
    assert back.normalization == NormalizationConfig(lower=2.0, upper=98.0)
    assert back.trained_on == {"dataset": "synthetic", "slices": [0, 1]}
    assert back.history == [{"epoch": 1, "train_loss": 0.5}]
    assert back.name == "tiny"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such model file"):
        SegmentationModel.load(tmp_path / "nope.pt")


def test_truncated_file_names_file(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pt: damaged or not a PyTorch file"):
        SegmentationModel.load(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match=r"junk\.pt: damaged or not a PyTorch file"):
        SegmentationModel.load(path)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_code_in_file_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-segtool-model", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        SegmentationModel.load(path)
    assert "code ran" not in capsys.readouterr().out


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"p\.pt"):
        SegmentationModel.load(path)


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a napari-segtool model file"):
        SegmentationModel.load(path)


def test_newer_format_version(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="newer than this napari-segtool"):
        SegmentationModel.load(path)


def test_weights_that_do_not_fit(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata"])
    meta["model_config"]["base_features"] = 8
    payload["metadata"] = json.dumps(meta)
    del payload["metadata_sha256"]  # as if edited by hand, or written before the checksums
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        SegmentationModel.load(path)


def test_damaged_metadata(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = "{not json"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="damaged model metadata"):
        SegmentationModel.load(path)


def test_save_is_atomic_on_failure(tmp_path, model, monkeypatch):
    path = model.save(tmp_path / "m.pt")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_bundled_and_new_models_load():
    names = [e.name for e in list_models()]
    assert "em-membranes-2d" in names
    em = load_model("em-membranes-2d")
    assert em.spatial_dims == 2
    assert em.class_names == ("cell interior", "membrane")
    assert load_model("new-3d").spatial_dims == 3
    new2d = load_model("new-2d")
    assert new2d.spatial_dims == 2
    assert new2d.trained_on == {}


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="neither a bundled model"):
        load_model("no-such-model")


def _overwrite_inside_largest_tensor(path, n_bytes=4096, value=0xFF):
    """Overwrite ``n_bytes`` in the middle of the largest tensor record, as a bad disk would.

    The zip's CRCs are left stale: torch's reader does not check them.
    """
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.file_size > n_bytes
    assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra field, then the stored bytes
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len + (info.file_size - n_bytes) // 2
    data[start : start + n_bytes] = bytes([value]) * n_bytes
    path.write_bytes(bytes(data))


def test_damaged_tensor_record_is_refused_naming_the_file(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    _overwrite_inside_largest_tensor(path, value=0x00)  # finite zeros: only the hash can tell
    with pytest.raises(CheckpointError, match=r"m\.pt: damaged: the weights do not match"):
        SegmentationModel.load(path)


def test_nan_bytes_in_an_old_file_without_checksum_are_refused(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload.pop("metadata_sha256") and payload["metadata"])
    del meta["weights_sha256"], meta["label_values"]  # as written before the checksums
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, path)
    assert SegmentationModel.load(path).label_values == (0, 1, 2)  # old files still load
    _overwrite_inside_largest_tensor(path)  # 0xFFFFFFFF is a float32 NaN
    with pytest.raises(CheckpointError, match=r"m\.pt: weights hold NaN or infinite values"):
        SegmentationModel.load(path)


def test_bundled_file_is_checksummed_and_verifies():
    payload = torch.load(WEIGHTS_DIR / "em_membranes_2d.pt", weights_only=True)
    meta = json.loads(payload["metadata"])
    assert meta["weights_sha256"] == weights_digest(payload["state_dict"])
    assert load_model("em-membranes-2d").label_values == (0, 1)


def test_saving_nan_weights_is_refused(tmp_path, model):
    with torch.no_grad():
        next(model.network.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save .* NaN or infinite"):
        model.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_small_file_claiming_a_huge_architecture_is_refused_before_building(
    tmp_path, model, monkeypatch
):
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    del payload["metadata_sha256"]
    meta = json.loads(payload["metadata"])

    def no_build(self, config):
        raise AssertionError(f"built a network for {config}")

    monkeypatch.setattr(UNet, "__init__", no_build)  # every architecture's constructor
    for change, message in [
        ({"base_features": 512, "depth": 6}, "base_features must be between 1 and 256"),
        ({"base_features": 256, "depth": 6}, r"needs 1,?\d{3},\d{3},\d{3} values, the file holds"),
        ({"out_channels": 65536}, "out_channels must be between"),
    ]:
        meta2 = {**meta, "model_config": {**meta["model_config"], **change}}
        payload["metadata"] = json.dumps(meta2)
        torch.save(payload, path)
        assert path.stat().st_size < 64 * 2**10
        with pytest.raises(CheckpointError, match=rf"m\.pt: .*{message}"):
            SegmentationModel.load(path)


def test_label_values_round_trip_and_are_checked(tmp_path):
    cfg = ModelConfig(spatial_dims=2, depth=2, base_features=4, out_channels=3)
    m = SegmentationModel.new(cfg, tile_shape=(32, 32), label_values=(0, 5, 117))
    assert m.class_names == ("background", "class 5", "class 117")
    back = SegmentationModel.load(m.save(tmp_path / "m.pt"))
    assert back.label_values == (0, 5, 117)
    with pytest.raises(CheckpointError, match="2 label values for a model with 3"):
        SegmentationModel.new(cfg, label_values=(0, 5))
    with pytest.raises(CheckpointError, match="repeat a value"):
        SegmentationModel.new(cfg, label_values=(0, 5, 5))
    with pytest.raises(CheckpointError, match="must be integers from 0"):
        SegmentationModel.new(cfg, label_values=(0, -1, 5))
