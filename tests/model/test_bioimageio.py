"""bioimage.io model packages (issue 13 item 4): export, bioimage.io's own checks (offline),
re-import from the weights alone, and every refusal."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_segtool.cli import main
from napari_segtool.config import ARCHITECTURES, InferenceConfig, ModelConfig
from napari_segtool.errors import CheckpointError, InputError
from napari_segtool.inference import segment
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.io import read_image
from napari_segtool.model import SegmentationModel, build_network, load_model, standalone
from napari_segtool.model import bioimageio_package as bp
from napari_segtool.workflows.sharing import crop_test_input, export_bioimageio
from tests.training.conftest import blobs

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
FP32 = InferenceConfig(device="cpu", precision="fp32", compile="off")

bioimageio_core = pytest.importorskip("bioimageio.core", reason="the [bioimageio] extra")
# bioimage.io's torchscript weights are TorchScript, which torch 2.13 marks deprecated
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


@pytest.fixture(autouse=True)
def _bioimageio_leaks():
    """bioimageio.spec leaves package files open; close them within each test (see
    :func:`~napari_segtool.model.bioimageio_package.bioimageio_calls`)."""
    with bp.bioimageio_calls():
        yield


@contextlib.contextmanager
def no_network():
    """Every attempt to resolve a name or open a connection raises (and is recorded)."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts


def test_no_network_really_blocks():
    with no_network() as attempts, pytest.raises(OSError, match="offline"):
        socket.create_connection(("example.org", 80), timeout=1)
    assert attempts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bundled EM model exported (and checked by bioimageio.core) with the network off."""
    path = tmp_path_factory.mktemp("bioimageio") / "em-membranes-2d.zip"
    model = load_model("em-membranes-2d")
    start = time.perf_counter()
    with no_network() as attempts:
        done = export_bioimageio(model, path)
    seconds = time.perf_counter() - start
    return {"path": path, "done": done, "attempts": attempts, "seconds": seconds}


def test_bundled_em_model_passes_the_bioimageio_model_test_offline(exported):
    done = exported["done"]
    assert exported["attempts"] == []  # nothing even tried to reach the network
    assert done.path == exported["path"]
    assert done.path.is_file()
    check = done.check
    assert check is not None
    assert check.passed, check.errors
    assert check.errors == ()
    names = [name for name, _ in check.checks]
    assert all(status == "passed" for _, status in check.checks)
    # bioimageio.core reproduced the expected output (what napari-segtool predicts) with
    # both weights formats, and ran the other declared input sizes
    for fmt in ("pytorch_state_dict", "torchscript"):
        assert any("Reproduce test outputs" in n and fmt in n for n in names), names
        assert any("inference" in n.lower() and fmt in n for n in names), names
    assert done.test_shape == (1, 1, 256, 256)
    # CI cost of the whole export including bioimageio.core's test (measured: see report)
    assert exported["seconds"] < 120


def test_package_validates_with_bioimageio_spec_offline(exported):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    with no_network() as attempts:
        descr = load_description(exported["path"], perform_io_checks=True)
    assert attempts == []
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.format()
    assert descr.validation_summary.status == "valid-format"
    assert descr.format_version.startswith("0.5.")
    assert str(descr.license) == "BSD-3-Clause"
    assert {str(c.doi) for c in descr.cite} == {
        "10.1007/978-3-319-24574-4_28",
        "10.1371/journal.pbio.1000502",
    }
    assert [a.name for a in descr.authors] == ["napari-segtool developers"]
    assert descr.covers
    assert descr.documentation is not None
    (inp,) = descr.inputs
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "y", "x"]
    ids = [p.id for p in inp.preprocessing]
    assert ids == ["ensure_dtype", "scale_range", "ensure_dtype"]
    scale = inp.preprocessing[1].kwargs
    assert (scale.min_percentile, scale.max_percentile) == (1.0, 99.8)
    assert [str(a) for a in scale.axes] == ["y", "x"]  # per image and channel, as ours
    (out,) = descr.outputs
    assert out.postprocessing[0].id == "softmax"
    assert [str(n) for n in out.axes[1].channel_names] == ["cell_interior", "membrane"]
    weights = descr.weights
    assert weights.pytorch_state_dict is not None
    assert weights.torchscript is not None
    arch = weights.pytorch_state_dict.architecture
    assert str(arch.callable) == "UNet"
    assert arch.kwargs == bp.network_kwargs(load_model("em-membranes-2d").config)[1]
    assert weights.torchscript.parent == "pytorch_state_dict"


def test_package_contents(exported):
    with zipfile.ZipFile(exported["path"]) as zf:
        names = set(zf.namelist())
        assert {
            "rdf.yaml",
            "weights.pt",
            "weights_torchscript.pt",
            bp.SOURCE_NAME,
            "test_input.npy",
            "test_output.npy",
            "sample_input.tif",
            "sample_output.tif",
            "cover.png",
            "README.md",
        } <= names
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        source = zf.read(bp.SOURCE_NAME).decode()
        readme = zf.read("README.md").decode()
        state = torch.load(io.BytesIO(zf.read("weights.pt")), weights_only=True)
        test_input = np.load(io.BytesIO(zf.read("test_input.npy")))
        test_output = np.load(io.BytesIO(zf.read("test_output.npy")))
        cover = zf.read("cover.png")
    assert rdf["config"]["napari-segtool"]["metadata"]["name"] == "em-membranes-2d"
    # the architecture source is the standalone module, and it imports only torch
    assert source == bp.network_source()
    imports = {line.split()[1] for line in source.splitlines() if line.startswith("import ")}
    froms = {line.split()[1] for line in source.splitlines() if line.startswith("from ")}
    assert {m.split(".")[0] for m in imports | froms} <= {"math", "torch", "typing", "__future__"}
    # a plain state dict, equal to the bundled model's weights
    bundled = load_model("em-membranes-2d").network.state_dict()
    assert set(state) == set(bundled)
    assert all(torch.equal(state[k], bundled[k]) for k in bundled)
    # documentation: training data, held-out figures, preprocessing, a Validation section
    for needle in ("## Validation", "0.8134", "99.8", "ISBI 2012"):
        assert needle in readme
    # the test input is a raw crop of held-out slice 24 (middle of 20-29), centred
    em = read_image(SAMPLE / "isbi2012_em.tif").data
    assert np.array_equal(test_input[0, 0], em[24, 128:384, 128:384].astype(np.float32))
    assert test_output.shape == (1, 2, 256, 256)
    np.testing.assert_allclose(test_output.sum(axis=1), 1.0, atol=1e-5)
    assert cover.startswith(b"\x89PNG")
    import imageio.v3 as iio

    assert iio.imread(cover).shape == (256, 512, 3)  # input | input with prediction, 2:1


def test_bioimageio_preprocessing_and_prediction_equal_napari_segtool(exported):
    """Another consumer (bioimageio.core) computes on a new image what napari-segtool does."""
    from bioimageio.core import create_prediction_pipeline, load_model_description
    from bioimageio.core.digest_spec import get_test_input_sample

    model = load_model("em-membranes-2d")
    descr = load_model_description(exported["path"], perform_io_checks=False)
    # preprocessing on the test input: scale_range equals napari-segtool's normalisation
    sample = get_test_input_sample(descr)
    raw = sample.members["raw"].data.values.copy()
    with create_prediction_pipeline(descr, weight_format="torchscript") as pipeline:
        pipeline.apply_preprocessing(sample)
        theirs = sample.members["raw"].data.values
        lo, hi = percentile_range(raw[0, 0], model.normalization)
        ours = apply_range(raw[0, 0][None], lo, hi)[0]
        np.testing.assert_allclose(theirs[0, 0], ours, rtol=0, atol=2e-6)
        # whole pipeline on an image the package has never seen (another slice and crop)
        em = read_image(SAMPLE / "isbi2012_em.tif").data
        image = em[27, 40:232, 300:492]
        config = dataclasses.replace(FP32, tile_shape=(192, 192))  # one tile: no blending
        probs = segment(image, model, config=config, return_probabilities=True).probabilities
        from bioimageio.core import Sample, Tensor

        raw = image[None, None].astype(np.float32)
        tensor = Tensor.from_numpy(raw, dims=("batch", "channel", "y", "x"))
        result = pipeline.predict_sample_without_blocking(
            Sample(members={"raw": tensor}, stat={}, id="new")
        )
    out = result.members["probabilities"].data.values[0]
    assert out.shape == probs.shape
    np.testing.assert_allclose(out, probs, atol=1e-4)
    assert np.array_equal(out.argmax(0), probs.argmax(0))


def test_reimport_gives_the_same_model_and_outputs(exported):
    original = load_model("em-membranes-2d")
    model = bp.read_package(exported["path"])
    again = load_model(exported["path"])  # the widget's "model file..." goes through here
    for m in (model, again):
        state = m.network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in original.network.state_dict().items())
        assert m.config == original.config
        assert m.normalization == original.normalization
        assert m.class_names == original.class_names
        assert m.label_values == original.label_values
        assert m.tile_shape == original.tile_shape
        assert m.trained_on == original.trained_on
        assert m.name == "em-membranes-2d"
    image = read_image(SAMPLE / "isbi2012_em.tif").data[22, :200, :300]
    a = segment(image, original, config=FP32, return_probabilities=True)
    b = segment(image, model, config=FP32, return_probabilities=True)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.probabilities, b.probabilities)


def test_cli_import_writes_a_model_file(exported, tmp_path, capsys):
    out = tmp_path / "em.pt"
    assert main(["import", str(exported["path"]), "-o", str(out)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == str(out)
    assert row["architecture"] == "unet"
    assert row["classes"] == ["cell interior", "membrane"]
    loaded = SegmentationModel.load(out)
    original = load_model("em-membranes-2d").network.state_dict()
    assert all(torch.equal(loaded.network.state_dict()[k], v) for k, v in original.items())
    # an existing model file is kept unless --force
    assert main(["import", str(exported["path"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["import", str(exported["path"]), "-o", str(out), "--force"]) == 0


# ------------------------------------------------------------------ the standalone network


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    ("spatial_dims", "norm", "dropout", "shape"),
    [
        (2, "batch", 0.0, (2, 1, 37, 21)),
        (2, "group", 0.2, (1, 1, 16, 24)),
        (2, "instance", 0.0, (1, 1, 19, 8)),
        (3, "none", 0.1, (1, 1, 9, 13, 10)),
        (3, "batch", 0.0, (1, 1, 8, 8, 8)),
    ],
)
def test_standalone_network_equals_ours(architecture, spatial_dims, norm, dropout, shape):
    cfg = ModelConfig(
        spatial_dims=spatial_dims, depth=3, base_features=4, norm=norm, dropout=dropout,
        architecture=architecture,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = build_network(cfg)
    if norm == "batch":  # running statistics that are not the defaults
        with torch.no_grad():
            ours(torch.randn(4, *shape[1:]) * 3 + 1)
    ours.eval()
    model = SegmentationModel(network=ours, tile_shape=(8,) * spatial_dims)
    theirs = bp.standalone_network(model)
    assert list(theirs.state_dict()) == list(ours.state_dict())  # same names, same order
    with bp.torchscript_allowed():
        scripted = torch.jit.script(theirs)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = ours(x)
        assert torch.equal(theirs(x), expected)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-6)


def test_standalone_source_runs_without_napari_segtool(tmp_path):
    """The shipped file imports on its own (as bioimageio.core imports it)."""
    import importlib.util

    path = tmp_path / bp.SOURCE_NAME
    path.write_text(bp.network_source())
    spec = importlib.util.spec_from_file_location("shipped_network", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.ResUNet(spatial_dims=2, depth=2, base_features=4).eval()
    assert net(torch.zeros(1, 1, 10, 6)).shape == (1, 2, 10, 6)
    assert "napari_segtool" not in bp.network_source().split('"""', 2)[2]


def test_standalone_module_is_the_one_in_the_tree():
    assert Path(standalone.__file__).read_text() == bp.network_source()


# ------------------------------------------------------------------------ test inputs


def test_crop_of_a_3d_model_is_a_multiple_of_its_levels():
    model = SegmentationModel.new(ModelConfig(spatial_dims=3, depth=4, base_features=4))
    ct = read_image(SAMPLE / "ct_small.tif").data  # 30 x 101 x 122
    crop = crop_test_input(ct, model)
    assert crop.shape == (1, 24, 96, 120)
    assert np.array_equal(crop[0], ct[3:27, 2:98, 1:121])


def test_no_bundled_sample_for_several_channels():
    from napari_segtool.workflows.sharing import default_test_image

    model = SegmentationModel.new(ModelConfig(in_channels=3, depth=2, base_features=4))
    with pytest.raises(InputError, match=r"reads 3 channels.*--test-image"):
        default_test_image(model)
    assert default_test_image(load_model("new-3d")).name == "ct_small.tif"


def test_crop_refusals():
    model = SegmentationModel.new(ModelConfig(depth=4, base_features=4))
    with pytest.raises(InputError, match="at least 8 voxels"):
        crop_test_input(np.zeros((5, 7)), model)
    with pytest.raises(InputError, match="slice 9: the stack has slices 0 to 2"):
        crop_test_input(np.zeros((3, 16, 16)), model, slice_index=9)
    with pytest.raises(InputError, match="3 channel"):
        crop_test_input(np.zeros((16, 16, 3)), model, channel_axis=-1)


# ------------------------------------------------------------------------ refusals


def rewrite(src: Path, dst: Path, *, drop=(), replace=None, rdf=None) -> Path:
    """A copy of the package ``src`` with members dropped or replaced, or rdf.yaml edited."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.pop(info.filename, zin.read(info))
            if info.filename == "rdf.yaml" and rdf is not None:
                content = yaml.safe_load(data)
                rdf(content)
                data = yaml.safe_dump(content).encode()
            zout.writestr(info.filename, data)
        for name, data in replace.items():
            zout.writestr(name, data)
    return dst


def refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        bp.read_package(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_refuses_what_is_not_a_package(tmp_path):
    refused(tmp_path / "gone.zip", "no such bioimage.io package")
    (tmp_path / "text.zip").write_text("hello")
    refused(tmp_path / "text.zip", "not a zip archive")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("notes.txt", "no rdf")
    refused(tmp_path / "empty.zip", "no rdf.yaml")


def test_refuses_a_package_from_another_tool(exported, tmp_path):
    def foreign(rdf):
        del rdf["config"]["napari-segtool"]

    path = rewrite(exported["path"], tmp_path / "foreign.zip", rdf=foreign)
    message = refused(path, "not a napari-segtool package")
    assert "never runs code shipped in a package" in message


def test_refuses_another_resource_type(exported, tmp_path):
    path = rewrite(exported["path"], tmp_path / "d.zip", rdf=lambda r: r.update(type="dataset"))
    refused(path, "describes a bioimage.io 'dataset', not a model")


def test_refuses_an_unknown_architecture(exported, tmp_path):
    def vit(rdf):
        rdf["config"]["napari-segtool"]["metadata"]["model_config"]["architecture"] = "vit"

    path = rewrite(exported["path"], tmp_path / "vit.zip", rdf=vit)
    refused(path, "architecture 'vit' is not one this napari-segtool knows")


def test_refuses_missing_weights(exported, tmp_path):
    path = rewrite(exported["path"], tmp_path / "nw.zip", drop=("weights.pt",))
    refused(path, "'weights.pt' named in rdf.yaml is missing")

    def no_entry(rdf):
        del rdf["weights"]["pytorch_state_dict"]

    path = rewrite(exported["path"], tmp_path / "ne.zip", rdf=no_entry)
    refused(path, "no pytorch_state_dict weights")


def test_refuses_damaged_weights(exported, tmp_path):
    with zipfile.ZipFile(exported["path"]) as zf:
        data = bytearray(zf.read("weights.pt"))
    state = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    # one weight changed: the file's sha256 in rdf.yaml no longer matches
    state["head.bias"] = state["head.bias"] + 1.0
    buf = io.BytesIO()
    torch.save(state, buf)
    path = rewrite(exported["path"], tmp_path / "d1.zip", replace={"weights.pt": buf.getvalue()})
    refused(path, "do not match the sha256 in rdf.yaml")

    # ... and with that sha256 updated too, napari-segtool's own weights checksum refuses it
    def new_sha(rdf):
        rdf["weights"]["pytorch_state_dict"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()

    path = rewrite(
        exported["path"], tmp_path / "d2.zip", replace={"weights.pt": buf.getvalue()}, rdf=new_sha
    )
    refused(path, "do not match the checksum stored")

    # truncated bytes: not a torch file
    def drop_sha(rdf):
        del rdf["weights"]["pytorch_state_dict"]["sha256"]

    path = rewrite(
        exported["path"], tmp_path / "d3.zip", replace={"weights.pt": bytes(data[:500])},
        rdf=drop_sha,
    )  # fmt: skip
    refused(path, "damaged weights 'weights.pt'")


def test_refuses_weights_holding_python_objects(exported, tmp_path):
    buf = io.BytesIO()
    torch.save({"when": datetime.datetime(2020, 1, 1)}, buf)

    def drop_sha(rdf):
        del rdf["weights"]["pytorch_state_dict"]["sha256"]

    path = rewrite(
        exported["path"], tmp_path / "p.zip", replace={"weights.pt": buf.getvalue()}, rdf=drop_sha
    )
    refused(path, "hold Python objects other than tensors")


def test_refuses_zip_slip(exported, tmp_path):
    path = rewrite(exported["path"], tmp_path / "slip.zip", replace={"../../evil.py": b"x = 1"})
    refused(path, "zip-slip")
    path = rewrite(exported["path"], tmp_path / "abs.zip", replace={"/etc/evil": b"x"})
    refused(path, "zip-slip")


def test_refuses_oversized_members(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "MAX_WEIGHTS_BYTES", 10_000)
    refused(exported["path"], "member 'weights.pt' is .* bytes, more than the 10,000")
    monkeypatch.setattr(bp, "MAX_MEMBERS", 3)
    refused(exported["path"], "holds .* files, more than the 3")


def test_refuses_an_edited_description(exported, tmp_path):
    def wider(rdf):
        rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["base_features"] = 32

    refused(rewrite(exported["path"], tmp_path / "k.zip", rdf=wider), "kwargs .* differ")

    def percentiles(rdf):
        rdf["inputs"][0]["preprocessing"][1]["kwargs"]["max_percentile"] = 99.0

    refused(rewrite(exported["path"], tmp_path / "n.zip", rdf=percentiles), "percentiles")


def test_code_shipped_in_a_package_never_runs(exported, tmp_path):
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(3)\n".encode()
    path = rewrite(exported["path"], tmp_path / "evil.zip", replace={bp.SOURCE_NAME: evil})
    model = bp.read_package(path)
    assert model.name == "em-membranes-2d"
    assert not marker.exists()


def test_cli_bad_input_is_one_line_exit_2(exported, tmp_path, capsys):
    cases = [
        (["import", str(tmp_path / "gone.zip")], "no such bioimage.io package"),
        (["import", str(tmp_path / "model.pt")], "ends in .zip"),
        (["export", "em-membranes-2d", "-o", str(tmp_path / "x.txt")], "must end in .zip"),
        (["export", "no-such-model", "-o", str(tmp_path / "x.zip")], "neither a bundled"),
        (
            ["export", "em-membranes-2d", "-o", str(tmp_path / "x.zip"), "--test-image", "none"],
            "no such file",
        ),
    ]
    cases.append(
        (
            ["export", "new-2d", "-o", str(tmp_path / "x.zip"), "--license", "no-such-licence"],
            "license 'no-such-licence': not an SPDX licence identifier",
        )
    )
    foreign = rewrite(
        exported["path"], tmp_path / "f.zip", rdf=lambda r: r["config"].pop("napari-segtool")
    )
    cases.append((["import", str(foreign)], "not a napari-segtool package"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err, err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.zip").exists()


def test_cli_export_of_a_new_model(tmp_path, capsys):
    from napari_segtool.io import write_image

    image = write_image(tmp_path / "blobs.tif", blobs((3, 70, 90))[0])
    out = tmp_path / "new.zip"
    argv = ["export", "new-resunet-2d", "-o", str(out), "--author", "A. Person"]
    with no_network():
        code = main([*argv, "--test-image", str(image), "--slice", "2"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["package"] == str(out)
    assert row["bioimageio"] == "passed"
    assert row["test_input_shape"] == [1, 1, 64, 88]
    assert row["architecture"] == "resunet"
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    assert [a["name"] for a in rdf["authors"]] == ["A. Person"]
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "ResUNet"
    assert "10.1109/CVPR.2016.90" in {c.get("doi") for c in rdf["cite"]}
    assert bp.read_package(out).config.architecture == "resunet"


def test_failing_checks_leave_nothing(tmp_path, monkeypatch):
    """A package that bioimage.io rejects is never moved into place."""
    model = SegmentationModel.new(ModelConfig(depth=2, base_features=4), tile_shape=(32, 32))
    real = bp.write_package

    def wrong_output(model, path, *, test_input, test_output, **kw):
        swapped = np.ascontiguousarray(test_output[:, ::-1])  # classes swapped: wrong output
        return real(model, path, test_input=test_input, test_output=swapped, **kw)

    from napari_segtool.workflows import sharing

    monkeypatch.setattr(sharing, "write_package", wrong_output)
    out = tmp_path / "bad.zip"
    image = read_image(SAMPLE / "isbi2012_em.tif").data[0, :64, :64]
    with no_network(), pytest.raises(CheckpointError, match=r"failed the bioimage\.io checks"):
        export_bioimageio(model, out, test_image=image)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_segment_with_a_package(exported, tmp_path):
    from napari_segtool.io import write_image

    em = read_image(SAMPLE / "isbi2012_em.tif").data[21, :96, :128]
    image = write_image(tmp_path / "slice.tif", em)
    out = tmp_path / "labels.tif"
    argv = ["segment", str(image), "-o", str(out), "--model", str(exported["path"])]
    assert main([*argv, "--precision", "fp32"]) == 0
    expected = segment(em, load_model("em-membranes-2d"), config=FP32).labels
    assert np.array_equal(read_image(out).data, expected)
