import numpy as np
from npe2 import PluginManifest

from napari_segtool import _sample_data


def test_em_sample_opens_as_image_and_reference_labels():
    (img, img_kw, img_type), (lab, lab_kw, lab_type) = _sample_data.isbi_em()
    assert (img_type, lab_type) == ("image", "labels")
    assert img.shape == lab.shape == (30, 512, 512)
    assert lab_kw["name"] == "isbi2012 em reference"
    assert img_kw["scale"] == lab_kw["scale"] == (50.0, 4.0, 4.0)
    assert set(np.unique(lab)) == {0, 1}


def test_ct_sample_has_3mm_voxels_and_organ_ids():
    (img, img_kw, _), (lab, lab_kw, _) = _sample_data.ct_small()
    assert img.dtype == np.int16
    assert img_kw["scale"] == (3.0, 3.0, 3.0)
    assert lab_kw["name"] == "ct small reference"
    assert {1, 2, 3, 5}.issubset(set(np.unique(lab)))


def test_manifest_is_valid_and_names_real_callables():
    import importlib

    pm = PluginManifest.from_distribution("napari-segtool")
    assert pm.name == "napari-segtool"
    for cmd in pm.contributions.commands:
        module, attr = cmd.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    keys = {s.key for s in pm.contributions.sample_data}
    assert keys == {"isbi_em", "ct_small"}
    assert [w.display_name for w in pm.contributions.widgets] == [
        "Segment",
        "Review",
        "Fine-tune",
        "Queue",
    ]
