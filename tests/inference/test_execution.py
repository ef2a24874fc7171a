"""How the network runs: layout, batch-norm folding, compilation, precision, threads."""

from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from napari_segtool.cli import main
from napari_segtool.config import FinetuneConfig, InferenceConfig, ModelConfig, TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import execution, predict
from napari_segtool.inference.execution import (
    MAX_CACHE_BYTES,
    MIN_COMPILE_CALLS,
    NetworkRunner,
    SpeedCache,
    decide_compile,
    fold_batch_norms,
    inference_network,
    resolve_precision,
    to_memory_format,
    use_all_cores,
)
from napari_segtool.inference.predict import segment
from napari_segtool.inference.predictor import make_runner
from napari_segtool.inference.seeding import TorchRandom
from napari_segtool.io import write_image
from napari_segtool.model import SegmentationModel
from napari_segtool.model.registry import REGISTRY
from napari_segtool.training import EpochReport, LabelledImage, iter_finetune, iter_train
from tests.training.conftest import blobs, tiny_model
from tests.training.test_loop import _sampler

CPU = torch.device("cpu")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def unet(dims=2, *, depth=3, cin=1, arch="unet", tile=None):
    tile = tile or ((32, 32) if dims == 2 else (8, 16, 16))
    config = ModelConfig(
        architecture=arch, spatial_dims=dims, depth=depth, base_features=4, in_channels=cin
    )
    return SegmentationModel.new(config, tile_shape=tile, seed=0)


def with_statistics(model, seed=1):
    """Give every batch norm non-trivial running statistics and affine parameters, so folding
    them into the convolutions is not close to the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.network.modules():
            if isinstance(m, BATCH_NORMS):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def n_batch_norms(net):
    return sum(isinstance(m, BATCH_NORMS) for m in net.modules())


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def eval_reference(model, x):
    """The model's own network in eval mode, float32, contiguous input, on a copy."""
    net = copy.deepcopy(model.network).eval()
    with torch.inference_mode():
        return net(x.contiguous())


# ----------------------------------------------------------------------------- layout


LAYOUT_CASES = [(2, (37, 29), 1), (2, (37, 29), 3), (3, (7, 21, 19), 1), (3, (7, 21, 19), 2)]


@pytest.mark.parametrize(("dims", "shape", "batch"), LAYOUT_CASES)
def test_channels_last_network_output_equals_contiguous(dims, shape, batch):
    model = with_statistics(unet(dims))
    x = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(2))
    last = make_runner(model, CPU, precision="fp32", memory_format="channels_last")
    plain = make_runner(model, CPU, precision="fp32", memory_format="contiguous")
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    weights = [m.weight for m in last.network.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    assert all(w.is_contiguous(memory_format=fmt) for w in weights)
    assert any(not w.is_contiguous() for w in weights)  # really another layout
    with torch.inference_mode():
        y_last, y_plain = last(x), plain(x)
    assert y_last.shape == (batch, 2, *shape)
    np.testing.assert_allclose(y_last.numpy(), y_plain.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(y_last.numpy(), eval_reference(model, x).numpy(), atol=1e-5)


def _segment_both_layouts(image, model, **kwargs):
    out = {}
    for fmt in ("channels_last", "contiguous"):
        config = InferenceConfig(precision="fp32", memory_format=fmt, compile="off", **kwargs)
        out[fmt] = segment(image, model, config=config, return_probabilities=True)
        assert out[fmt].execution["memory_format"] == fmt
        assert out[fmt].execution["precision"] == "fp32"
    return out["channels_last"], out["contiguous"]


@pytest.mark.parametrize(
    ("dims", "shape", "batch_size"),
    [(2, (37, 29), 1), (2, (3, 37, 29), 4), (3, (7, 21, 19), 1), (3, (7, 21, 19), 3)],
)
def test_segment_probabilities_do_not_depend_on_the_layout(dims, shape, batch_size):
    model = with_statistics(unet(dims, tile=(16, 16) if dims == 2 else (4, 16, 16)))
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    last, plain = _segment_both_layouts(
        image, model, tile_shape=model.tile_shape, overlap=0.25, batch_size=batch_size
    )
    np.testing.assert_allclose(last.probabilities, plain.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(last.labels, plain.labels)


@pytest.mark.parametrize(("dims", "cin", "shape"), [(2, 3, (37, 29, 3)), (3, 2, (7, 2, 21, 19))])
def test_multichannel_tiles_reach_the_network_channels_last(monkeypatch, dims, cin, shape):
    model = with_statistics(unet(dims, cin=cin, tile=(16, 16) if dims == 2 else (4, 16, 16)))
    image = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    channel_axis = -1 if dims == 2 else 1
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    seen = []
    real = predict.make_predictor

    def spy(*args, **kwargs):
        inner = real(*args, **kwargs)

        def predictor(x):  # what the tiling hands over, before the runner sees it
            seen.append((x.shape[1], x.is_contiguous(memory_format=fmt), x.is_contiguous()))
            return inner(x)

        return predictor

    monkeypatch.setattr(predict, "make_predictor", spy)
    out = {}
    for layout in ("channels_last", "contiguous"):
        seen.clear()
        config = InferenceConfig(tile_shape=model.tile_shape, batch_size=3, precision="fp32",
                                 memory_format=layout, compile="off")  # fmt: skip
        out[layout] = segment(image, model, config=config, channel_axis=channel_axis,
                              return_probabilities=True)  # fmt: skip
        assert len(seen) > 1
        assert all(c == cin for c, _, _ in seen)
        if layout == "channels_last":  # channel axis innermost, not PyTorch's default order
            assert all(is_last and not is_plain for _, is_last, is_plain in seen)
        else:
            assert all(is_plain for _, _, is_plain in seen)
    np.testing.assert_allclose(
        out["channels_last"].probabilities, out["contiguous"].probabilities, rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(out["channels_last"].labels, out["contiguous"].labels)


# ----------------------------------------------------------------------------- batch norms


@pytest.mark.parametrize("arch", list(REGISTRY))
@pytest.mark.parametrize("dims", [2, 3])
def test_folded_batch_norms_compute_the_same_function(arch, dims):
    model = with_statistics(unet(dims, arch=arch))
    model.network.train()
    before = state(model.network)
    n_norms = n_batch_norms(model.network)
    assert n_norms > 0
    if arch == "unet":  # two conv + norm pairs per block: depth encoders, depth - 1 decoders
        assert n_norms == 2 * (2 * model.config.depth - 1)

    net = copy.deepcopy(model.network).eval()
    with torch.no_grad():
        assert fold_batch_norms(net) == n_norms
    assert n_batch_norms(net) == 0

    folded = inference_network(model.network, dims, device=CPU, memory_format="channels_last")
    assert not folded.training
    assert n_batch_norms(folded) == 0
    shape = (37, 29) if dims == 2 else (7, 21, 19)
    x = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        y = folded(x)
    np.testing.assert_allclose(y.numpy(), eval_reference(model, x).numpy(), rtol=0, atol=1e-5)

    # the model's own network is untouched: weights, norms, mode
    assert_same_state(before, state(model.network))
    assert n_batch_norms(model.network) == n_norms
    assert model.network.training


def test_segment_leaves_the_models_network_alone():
    model = with_statistics(unet(2))
    model.network.train()
    before = state(model.network)
    weight = model.network.encoders[0][0].weight
    segment(np.random.default_rng(0).random((40, 40)).astype(np.float32), model,
            config=InferenceConfig(precision="fp32", compile="off"))  # fmt: skip
    assert model.network.training
    assert_same_state(before, state(model.network))
    assert model.network.encoders[0][0].weight is weight
    assert weight.is_contiguous()
    assert n_batch_norms(model.network) == 10


# ----------------------------------------------------------------------------- compile


def _exploding_compile(calls):
    def compile_(network, **kwargs):
        calls.append(kwargs)

        def broken(x):
            raise RuntimeError("backend exploded\nmore detail on a second line")

        return broken

    return compile_


def test_a_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    model = unet(2, depth=2)
    image = np.random.default_rng(0).random((70, 60)).astype(np.float32)
    kw = {"tile_shape": (32, 32), "batch_size": 2, "precision": "fp32"}
    eager = segment(image, model, config=InferenceConfig(compile="off", **kw),
                    return_probabilities=True)  # fmt: skip
    calls = []
    monkeypatch.setattr(execution.torch, "compile", _exploding_compile(calls))
    with caplog.at_level(logging.WARNING, logger="napari_segtool"):
        result = segment(image, model, config=InferenceConfig(compile="on", **kw),
                         return_probabilities=True)  # fmt: skip
    assert len(calls) == 1
    np.testing.assert_array_equal(result.labels, eager.labels)
    np.testing.assert_allclose(result.probabilities, eager.probabilities, rtol=0, atol=1e-6)
    ex = result.execution
    assert ex["compiled"] is False
    assert ex["compile_failed"] == "RuntimeError: backend exploded"
    ours = [r for r in caplog.records if r.name.startswith("napari_segtool")]
    warnings = [r for r in ours if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "backend exploded" in warnings[0].getMessage()
    assert eager.execution["compile_failed"] is None


def test_torch_compile_raising_itself_falls_back_to_eager(monkeypatch, caplog):
    model = unet(2, depth=2)
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    kw = {"tile_shape": (32, 32), "batch_size": 2, "precision": "fp32"}
    eager = segment(image, model, config=InferenceConfig(compile="off", **kw))

    def compile_(network, **kwargs):
        raise ImportError("no inductor here")

    monkeypatch.setattr(execution.torch, "compile", compile_)
    with caplog.at_level(logging.WARNING, logger="napari_segtool"):
        result = segment(image, model, config=InferenceConfig(compile="on", **kw))
    np.testing.assert_array_equal(result.labels, eager.labels)
    assert result.execution["compiled"] is False
    assert result.execution["compile_failed"] == "ImportError: no inductor here"
    assert sum("no inductor here" in r.getMessage() for r in caplog.records) == 1


def test_out_of_memory_in_a_compiled_network_is_not_swallowed(monkeypatch):
    net = nn.Conv2d(1, 2, 3, padding=1).eval()

    def compile_(network, **kwargs):
        def oom(x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return oom

    monkeypatch.setattr(execution.torch, "compile", compile_)
    runner = NetworkRunner(net, spatial_dims=2, device=CPU, precision="fp32",
                           memory_format="channels_last", compile=True)  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="out of memory"), torch.inference_mode():
        runner(x)
    with torch.inference_mode():  # the retry (a smaller batch) runs eagerly
        y = runner(x[:1])
        np.testing.assert_allclose(y.numpy(), net(x[:1]).numpy(), rtol=0, atol=1e-6)


# torch's inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit API
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_really_compiled_network_gives_the_eager_result():
    model = unet(2, depth=2, tile=(32, 32))
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    kw = {"tile_shape": (32, 32), "batch_size": 3, "precision": "fp32"}  # 2 batches: 3 + 1
    eager = segment(image, model, config=InferenceConfig(compile="off", **kw),
                    return_probabilities=True)  # fmt: skip
    compiled = segment(image, model, config=InferenceConfig(compile="on", **kw),
                       return_probabilities=True)  # fmt: skip
    assert compiled.execution["compiled"] is True, compiled.execution
    assert compiled.execution["compile_failed"] is None
    assert eager.execution["compiled"] is False
    np.testing.assert_array_equal(compiled.labels, eager.labels)
    np.testing.assert_allclose(compiled.probabilities, eager.probabilities, rtol=0, atol=1e-5)


def test_decide_compile():
    kw = {"seconds_per_call": 10.0, "warmup_seconds": 1.0, "speedup": 2.0}
    for calls in range(MIN_COMPILE_CALLS):  # a huge saving, still too short a job
        d = decide_compile("auto", calls=calls, **kw)
        assert not d.compile
        assert "too short" in d.reason
    assert decide_compile("auto", calls=MIN_COMPILE_CALLS, **kw).compile
    # saving = calls * s * (1 - 1 / speedup): 100 * 0.5 * 0.5 = 25 s
    at = {"calls": 100, "seconds_per_call": 0.5, "speedup": 2.0}
    assert decide_compile("auto", warmup_seconds=24.0, **at).compile
    slow = decide_compile("auto", warmup_seconds=26.0, **at)
    assert not slow.compile
    assert "pay back" in slow.reason
    assert not decide_compile("auto", calls=10**6, seconds_per_call=1.0, warmup_seconds=1.0,
                              speedup=1.0).compile  # fmt: skip
    for calls in (0, 1, 10**6):
        assert not decide_compile("off", calls=calls, **kw).compile
        assert decide_compile("on", calls=calls, **{**kw, "speedup": 0.5}).compile


def test_one_gui_image_is_not_compiled():
    model = unet(2, depth=2, tile=(256, 256))
    image = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    result = segment(image, model, config=InferenceConfig(compile="auto"))
    assert result.execution["compiled"] is False
    assert "too short" in result.execution["compile_reason"]


# ----------------------------------------------------------------------------- precision


class Measure:
    def __init__(self, seconds):
        self.seconds = seconds
        self.calls = []

    def __call__(self, precision):
        self.calls.append(precision)
        return self.seconds[precision]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with native bfloat16, whatever this one has."""
    if not torch.backends.mkldnn.is_available():  # pragma: no cover - builds without oneDNN
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(execution, "_cpu_has_bf16", lambda: True)


def test_auto_takes_bf16_only_when_clearly_faster(bf16_cpu, tmp_path):
    fast = Measure({"fp32": 1.0, "bf16": 0.5})
    choice = resolve_precision("auto", CPU, measure=fast, cache=SpeedCache(None), key="a")
    assert choice.precision == "bf16"
    assert sorted(fast.calls) == ["bf16", "fp32"]
    assert choice.seconds == {"fp32": 1.0, "bf16": 0.5}
    close = Measure({"fp32": 1.0, "bf16": 0.95})
    assert resolve_precision("auto", CPU, measure=close, key="b").precision == "fp32"
    edge = Measure({"fp32": 1.15, "bf16": 1.0})
    assert resolve_precision("auto", CPU, measure=edge, key="c").precision == "bf16"


def test_auto_measures_once_then_reads_the_cache(bf16_cpu, tmp_path):
    path = tmp_path / "s.json"
    first = Measure({"fp32": 1.0, "bf16": 0.5})
    assert resolve_precision("auto", CPU, measure=first, cache=SpeedCache(path),
                             key="k").precision == "bf16"  # fmt: skip
    assert len(first.calls) == 2
    assert json.loads(path.read_text())["k"] == {"forward_fp32": 1.0, "forward_bf16": 0.5}
    again = Measure({"fp32": 1.0, "bf16": 100.0})  # would pick fp32 if it were asked
    choice = resolve_precision("auto", CPU, measure=again, cache=SpeedCache(path), key="k")
    assert again.calls == []
    assert choice.precision == "bf16"
    other = Measure({"fp32": 1.0, "bf16": 0.95})  # another key is measured afresh
    assert resolve_precision("auto", CPU, measure=other, cache=SpeedCache(path),
                             key="other").precision == "fp32"  # fmt: skip
    assert len(other.calls) == 2


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2, 3]",
        json.dumps({"k": {"forward_fp32": "fast", "forward_bf16": -1.0}}).encode(),
        json.dumps({"k": {"forward_fp32": True, "forward_bf16": 0}}).encode(),
        b'{"k": {"forward_fp32": 1' + b"0" * 400 + b', "forward_bf16": NaN}}',  # beyond float
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,  # nested too deep for the JSON parser
        json.dumps(
            {"k": {"forward_fp32": 1.0, "forward_bf16": 0.1}, "pad": "x" * MAX_CACHE_BYTES}
        ).encode(),
    ],
)
def test_a_bad_speed_cache_is_ignored(bf16_cpu, tmp_path, content):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    cache = SpeedCache(path)
    assert cache.get("k") == {}
    fresh = Measure({"fp32": 1.0, "bf16": 0.95})
    assert resolve_precision("auto", CPU, measure=fresh, cache=cache, key="k").precision == "fp32"
    assert sorted(fresh.calls) == ["bf16", "fp32"]
    assert json.loads(path.read_text()) == {"k": {"forward_fp32": 1.0, "forward_bf16": 0.95}}


def test_seeded_mc_dropout_does_not_depend_on_the_speed_cache(monkeypatch, tmp_path, bf16_cpu):
    monkeypatch.setenv("NAPARI_SEGTOOL_CACHE_DIR", str(tmp_path))  # cold: auto times a batch
    config = ModelConfig(spatial_dims=2, depth=2, base_features=4, dropout=0.5)
    model = SegmentationModel.new(config, tile_shape=(32, 32), seed=0)
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    inference = InferenceConfig(device="cpu", mc_dropout=True, compile="off")

    def run():
        with TorchRandom(1, CPU).active():
            return segment(image, model, config=inference, return_probabilities=True)

    cold = run()
    assert (tmp_path / "speed.json").is_file()
    warm = run()
    assert warm.execution["precision"] == cold.execution["precision"]
    np.testing.assert_array_equal(warm.probabilities, cold.probabilities)


def test_fp16_on_the_cpu_is_refused_naming_cuda():
    never = Measure({})
    with pytest.raises(InputError, match="CUDA"):
        resolve_precision("fp16", CPU, measure=never)
    with pytest.raises(InputError, match="CUDA"):
        segment(np.random.default_rng(0).random((16, 16)), unet(2, depth=2),
                config=InferenceConfig(device="cpu", precision="fp16"))  # fmt: skip
    assert never.calls == []


def test_without_native_bf16_the_cpu_refuses_bf16_and_auto_is_fp32(monkeypatch):
    monkeypatch.setattr(execution, "_cpu_has_bf16", lambda: False)
    never = Measure({})
    with pytest.raises(InputError, match="bfloat16"):
        resolve_precision("bf16", CPU, measure=never)
    choice = resolve_precision("auto", CPU, measure=never, cache=SpeedCache(None), key="k")
    assert choice.precision == "fp32"
    assert never.calls == []
    assert resolve_precision("fp32", CPU, measure=never).precision == "fp32"
    result = segment(np.random.default_rng(0).random((16, 16)), unet(2, depth=2),
                     config=InferenceConfig(device="cpu"))  # fmt: skip
    assert result.execution["precision"] == "fp32"


# ----------------------------------------------------------------------------- model file


def _conv_weights(net, dims):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return [m.weight for m in net.modules() if isinstance(m, conv) and m.kernel_size[0] > 1]


def test_a_channels_last_trained_model_saves_contiguous_and_loads_the_same(tmp_path):
    image, labels = blobs((64, 64))
    model = tiny_model()
    cfg = FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=2, patch_shape=(32, 32),
                         validation_fraction=0.0, device="cpu")  # fmt: skip
    assert cfg.memory_format == "channels_last"
    gen = iter_finetune(model, [LabelledImage(image, labels)], config=cfg, progress_every=None)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            trained = stop.value.model
            break
    weights = _conv_weights(trained.network, 2)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # the case save() must handle
    path = trained.save(tmp_path / "m.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.is_contiguous() for v in saved.values())
    back = SegmentationModel.load(path)
    assert_same_state(state(trained.network), state(back.network))

    x = torch.randn(2, 1, 37, 29, generator=torch.Generator().manual_seed(0))
    ref = eval_reference(trained, x)
    for fmt in ("channels_last", "contiguous"):
        with torch.inference_mode():
            y = make_runner(back, CPU, precision="fp32", memory_format=fmt)(x)
        np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    img = np.random.default_rng(1).random((37, 29)).astype(np.float32)
    a, b = _segment_both_layouts(img, back, tile_shape=(32, 32), batch_size=2)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_to_memory_format_then_save_round_trips(tmp_path):
    model = with_statistics(unet(3))
    to_memory_format(model.network, 3, "channels_last")
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d)
               for w in _conv_weights(model.network, 3))  # fmt: skip
    path = model.save(tmp_path / "m3.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.is_contiguous() for v in saved.values())
    back = SegmentationModel.load(path)
    x = torch.randn(1, 1, 7, 21, 19, generator=torch.Generator().manual_seed(0))
    ref = eval_reference(model, x)
    for fmt in ("channels_last", "contiguous"):
        with torch.inference_mode():
            y = make_runner(back, CPU, precision="fp32", memory_format=fmt)(x)
        np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training


def _train(precision, caplog):
    image, labels = blobs((128, 128))
    model = tiny_model()
    seen = []

    def spy(module, args):
        if module.training:  # a training step (the precision probe runs an eval copy)
            x = args[0]
            seen.append((
                x.is_contiguous(memory_format=torch.channels_last),
                all(w.is_contiguous(memory_format=torch.channels_last)
                    for w in _conv_weights(module, 2)),
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
            ))  # fmt: skip

    model.network.register_forward_pre_hook(spy)
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=4, steps=40, steps_per_epoch=10,
                         learning_rate=1e-2, device="cpu", precision=precision)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="napari_segtool.training"):
        gen = iter_train(model, _sampler(image, labels, model), config=cfg)
        reports = [r for r in gen if isinstance(r, EpochReport)]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on")]
    assert len(lines) == 1, lines
    ran = lines[0].split(" in ")[1].split(",")[0]
    return model, reports, seen, ran


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_training_runs_channels_last_in_its_precision_and_learns(precision, caplog):
    if precision == "bf16" and not execution.supports("bf16", CPU):
        with pytest.raises(InputError, match="bfloat16"):
            _train(precision, caplog)
        return
    model, reports, seen, ran = _train(precision, caplog)
    assert ran in ("fp32", "bf16") if precision == "auto" else ran == precision
    assert len(seen) == 40
    assert all(x_last and w_last for x_last, w_last, _ in seen)
    expected = {"fp32": None, "bf16": torch.bfloat16}[ran]
    assert all(dtype == expected for _, _, dtype in seen)
    assert all(np.isfinite(r.train_loss) for r in reports)
    assert reports[-1].train_loss < 0.7 * reports[0].train_loss
    assert all(w.is_contiguous(memory_format=torch.channels_last)
               for w in _conv_weights(model.network, 2))  # fmt: skip


# ----------------------------------------------------------------------------- threads


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_use_all_cores(monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n - 1) if n > 1 else 1)
    assert use_all_cores() == n
    assert torch.get_num_threads() == n


def test_omp_num_threads_wins(monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert use_all_cores() == 1
    assert torch.get_num_threads() == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_fp16_on_the_cpu_exits_2_naming_cuda(tmp_path, capsys):
    img = write_image(tmp_path / "img.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    args = ["segment", str(img), "-o", str(tmp_path / "x.tif"), "--model", "new-2d",
            "--device", "cpu", "--precision", "fp16"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "x.tif").exists()


def test_cli_fp32_without_compilation_reports_its_execution(tmp_path, capsys):
    pixels = (np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)
    img = write_image(tmp_path / "img.tif", pixels)
    out = tmp_path / "x.tif"
    args = ["segment", str(img), "-o", str(out), "--model", "new-2d", "--device", "cpu",
            "--precision", "fp32", "--compile", "off"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    ex = summary["execution"]
    assert ex["precision"] == "fp32"
    assert ex["compiled"] is False
    assert ex["compile_reason"] == "compile off: eager"
    assert ex["memory_format"] == "channels_last"
    assert out.exists()
    assert main([*args[:-4], "--no-amp"]) == 0
    assert json.loads(capsys.readouterr().out)["execution"]["precision"] == "fp32"
