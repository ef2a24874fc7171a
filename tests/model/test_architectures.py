"""One test matrix over every registered architecture, and the architecture seam's file rules."""

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from napari_segtool.config import ARCHITECTURES, FinetuneConfig, InferenceConfig, ModelConfig
from napari_segtool.errors import CheckpointError, InputError
from napari_segtool.inference import segment
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.model import REGISTRY, ResUNet, SegmentationModel, UNet, load_model
from napari_segtool.model.bundled import WEIGHTS_DIR
from napari_segtool.model.classes import extend_classes
from napari_segtool.model.modelfile import FORMAT_VERSION
from napari_segtool.model.registry import architecture, build_network, state_size
from napari_segtool.model.resunet import ResBlock
from napari_segtool.training import EpochReport, LabelledImage, iter_finetune

ARCHS = list(REGISTRY)
SHAPES = {2: (37, 21), 3: (9, 13, 6)}  # odd sizes: the network pads and crops back


def _config(arch, dims=2, **kwargs):
    return ModelConfig(spatial_dims=dims, depth=3, base_features=4, architecture=arch, **kwargs)


def _model(arch, dims=2, seed=0, **kwargs):
    tile = (32, 32) if dims == 2 else (8, 16, 16)
    return SegmentationModel.new(_config(arch, dims, **kwargs), tile_shape=tile, seed=seed)


def _trained_stats(model):
    """Give batch-norm layers non-trivial running statistics, so files must carry buffers."""
    model.network.train()
    with torch.no_grad():
        model.network(
            torch.randn(2, 1, *model.tile_shape, generator=torch.Generator().manual_seed(1))
        )
    model.network.eval()
    return model


def _rewrite(path, change_meta, *, version=None):
    """Edit a saved file's metadata as an older or foreign writer would have left it."""
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata"])
    change_meta(meta)
    payload["metadata"] = json.dumps(meta)
    payload["metadata_sha256"] = hashlib.sha256(payload["metadata"].encode()).hexdigest()
    if version is not None:
        payload["format_version"] = version
    torch.save(payload, path)


def test_the_registry_holds_exactly_the_configs_names():
    assert tuple(REGISTRY) == ARCHITECTURES == ("unet", "resunet")
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert entry.network.architecture == name  # type: ignore[attr-defined]
    with pytest.raises(InputError, match=r"unknown architecture 'dense': known .*unet, resunet"):
        architecture("dense")
    with pytest.raises(InputError, match=r"architecture must be one of .*got 'dense'"):
        ModelConfig(architecture="dense")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"UNet builds architecture 'unet'.*'resunet'"):
        UNet(_config("resunet"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("dims", "norm", "depth", "cin", "cout", "base"),
    [
        (2, "batch", 3, 1, 2, 4),
        (2, "none", 1, 2, 3, 4),
        (2, "group", 4, 4, 2, 4),  # in_channels == base_features: an identity skip
        (3, "instance", 2, 1, 4, 3),
        (3, "batch", 3, 2, 2, 2),
    ],
)
def test_state_size_is_exact(arch, dims, norm, depth, cin, cout, base):
    cfg = ModelConfig(spatial_dims=dims, norm=norm, depth=depth, in_channels=cin,
                      out_channels=cout, base_features=base, architecture=arch)  # fmt: skip
    net = build_network(cfg)
    assert type(net) is REGISTRY[arch].network
    assert state_size(cfg) == sum(t.numel() for t in net.state_dict().values())


def test_the_residual_network_is_larger_by_its_projections_only():
    # every block changes its channel count here, so each one adds a 1x1 conv and a norm
    unet_cfg, res_cfg = _config("unet"), _config("resunet")
    blocks = [(1, 4), (4, 8), (8, 16), (16, 8), (8, 4)]  # 3 encoder, 2 decoder levels
    extra = sum(cin * cout + 4 * cout + 1 for cin, cout in blocks)  # batch norm: 4 per ch + 1
    assert state_size(res_cfg) - state_size(unet_cfg) == extra


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward_on_odd_sizes(arch, dims):
    torch.manual_seed(0)
    net = build_network(_config(arch, dims, out_channels=3, dropout=0.2))
    x = torch.randn(2, 1, *SHAPES[dims], requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *SHAPES[dims])
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []  # every weight (projections included) takes part
    assert isinstance(net.head, torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)
    assert net.head.kernel_size == (1,) * dims
    assert net.config.architecture == arch


def test_a_residual_block_adds_its_input():
    cfg = _config("resunet")
    block = ResBlock(cfg, 4, 4).eval()
    assert isinstance(block.skip, torch.nn.Identity)
    with torch.no_grad():
        last_norm = block.body[-1]
        last_norm.weight.zero_()
        last_norm.bias.zero_()  # the body now outputs 0: only the skip is left
        x = torch.randn(1, 4, 6, 5)
        torch.testing.assert_close(block(x), torch.nn.functional.leaky_relu(x, 0.01))
    projecting = ResBlock(cfg, 3, 4)
    assert projecting.skip[0].kernel_size == (1, 1)
    assert projecting.skip[0].out_channels == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_a_huge_network_is_refused_before_it_is_allocated(arch):
    cfg = ModelConfig(base_features=256, depth=7, architecture=arch)
    assert state_size(cfg) > 10**9
    with pytest.raises(InputError, match=rf"a {arch} network .* lower base_features or depth"):
        build_network(cfg)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dims", [2, 3])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, arch, dims):
    model = _trained_stats(_model(arch, dims))
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert json.loads(payload["metadata"])["model_config"]["architecture"] == arch
    back = SegmentationModel.load(path)
    assert type(back.network) is REGISTRY[arch].network
    assert back.config == model.config
    x = torch.randn(1, 1, *SHAPES[dims])
    with torch.inference_mode():
        torch.testing.assert_close(back.network(x), model.network(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dims", [2, 3])
def test_segment_equals_the_networks_own_argmax(arch, dims):
    model = _trained_stats(_model(arch, dims))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 19) if dims == 2 else (7, 12, 10), dtype=np.uint8)
    tile = (32, 32) if dims == 2 else (8, 16, 16)  # one tile holds the whole image
    config = InferenceConfig(tile_shape=tile, device="cpu", precision="fp32")
    result = segment(image, model, config=config)
    lo, hi = percentile_range(image, model.normalization)
    x = torch.from_numpy(apply_range(image[None], lo, hi)[None].copy())
    with torch.inference_mode():
        expected = model.network(x).argmax(1)[0].numpy()
    assert result.labels.shape == image.shape
    np.testing.assert_array_equal(result.labels, expected)


def _blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[(slice(None),) * (len(shape) - 2) + (slice(4, 14), slice(6, 20))] = 1
    image = (60 + 120 * labels + rng.normal(0, 20, shape)).clip(0, 255).astype(np.uint8)
    return image, labels


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dims", [2, 3])
def test_one_training_step_changes_the_weights_with_a_finite_loss(arch, dims):
    model = _model(arch, dims)
    image, labels = _blobs((32, 32) if dims == 2 else (8, 24, 24))
    patch = (32, 32) if dims == 2 else (8, 16, 16)
    cfg = FinetuneConfig(epochs=1, steps_per_epoch=1, batch_size=2, patch_shape=patch,
                         learning_rate=1e-2, validation_fraction=0.0, device="cpu",
                         precision="fp32")  # fmt: skip
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    gen = iter_finetune(model, [LabelledImage(image, labels)], config=cfg, progress_every=None)
    reports = []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    epochs = [r for r in reports if isinstance(r, EpochReport)]
    assert len(epochs) == 1
    assert math.isfinite(epochs[0].train_loss)
    assert epochs[0].train_loss > 0
    trained = result.model
    assert type(trained.network) is REGISTRY[arch].network
    changed = [k for k, v in trained.network.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed
    assert any(k.startswith("encoders.0.") for k in changed)
    for k, v in model.network.state_dict().items():  # the starting model is not modified
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_extend_classes_keeps_the_old_outputs(tmp_path, arch):
    model = _trained_stats(_model(arch))
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model.network.eval()(x)
    grown = extend_classes(model, (7,))
    assert grown.config.architecture == arch
    assert grown.config.out_channels == 3
    with torch.inference_mode():
        after = grown.network.eval()(x)
    torch.testing.assert_close(after[:, :2], before)
    assert (after.argmax(1) < 2).all()
    loaded = SegmentationModel.load(grown.save(tmp_path / "grown.pt"))
    assert type(loaded.network) is REGISTRY[arch].network
    with torch.inference_mode():
        torch.testing.assert_close(loaded.network(x), after)


def test_an_old_file_without_a_name_loads_as_a_unet(tmp_path):
    model = _trained_stats(_model("unet"))
    path = model.save(tmp_path / "old.pt")
    _rewrite(path, lambda meta: meta["model_config"].pop("architecture"), version=1)
    back = SegmentationModel.load(path)
    assert back.config.architecture == "unet"
    assert type(back.network) is UNet
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(back.network(x), model.network(x), rtol=0, atol=0)


def test_the_bundled_file_is_an_old_format_unet_and_stays_unchanged():
    path = WEIGHTS_DIR / "em_membranes_2d.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 1
    assert "architecture" not in json.loads(payload["metadata"])["model_config"]
    model = load_model("em-membranes-2d")
    assert model.config.architecture == "unet"
    assert type(model.network) is UNet
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_residual_weights_in_a_file_without_a_name_are_refused(tmp_path):
    # an unnamed file is a U-Net: residual weights do not fit one, and the size check says so
    path = _model("resunet").save(tmp_path / "m.pt")
    _rewrite(path, lambda meta: meta["model_config"].pop("architecture"), version=1)
    needed, held = state_size(_config("unet")), state_size(_config("resunet"))
    with pytest.raises(CheckpointError, match=rf"m\.pt: weights do not fit .*unet .*needs "
                       rf"{needed:,} values, the file holds {held:,}"):  # fmt: skip
        SegmentationModel.load(path)


@pytest.mark.parametrize("name", ["densenet", 3, ["unet"], None])
def test_an_unknown_architecture_is_refused_before_building(tmp_path, monkeypatch, name):
    path = _model("unet").save(tmp_path / "m.pt")

    def rename(meta):
        meta["model_config"]["architecture"] = name

    _rewrite(path, rename)

    def no_build(self, config):
        raise AssertionError(f"built a network for {config}")

    monkeypatch.setattr(UNet, "__init__", no_build)  # ResUNet's too: it inherits it
    shown = re.escape(repr(name))
    with pytest.raises(CheckpointError, match=rf"m\.pt: architecture {shown} is not one this "
                       r"napari-segtool knows \(unet, resunet\)"):  # fmt: skip
        SegmentationModel.load(path)


@pytest.mark.parametrize(("name", "dims"), [("new-resunet-2d", 2), ("new-resunet-3d", 3)])
def test_untrained_residual_starting_points(name, dims):
    model = load_model(name)
    assert isinstance(model.network, ResUNet)
    assert model.spatial_dims == dims
    assert model.trained_on == {}


def test_new_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (_model("resunet", seed=s) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.network.head.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
