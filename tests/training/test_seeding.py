"""Seeds are explicit and local: training and MC dropout never touch torch's global state."""

import numpy as np
import pytest
import torch

from napari_segtool.active_learning.uncertainty import mc_dropout
from napari_segtool.config import InferenceConfig, ModelConfig, TrainingConfig
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.inference.seeding import TorchRandom
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.model import SegmentationModel
from napari_segtool.training import PatchSampler, iter_train
from tests.training.conftest import blobs


def dropout_model() -> SegmentationModel:
    config = ModelConfig(spatial_dims=2, depth=2, base_features=4, dropout=0.5)
    return SegmentationModel.new(config, tile_shape=(32, 32), seed=0)


def _train(seed: int, progress_every: int | None = None) -> dict[str, torch.Tensor]:
    image, labels = blobs((48, 48))
    model = dropout_model()
    lo, hi = percentile_range(image, model.normalization)
    sampler = PatchSampler([apply_range(image[None], lo, hi, channel_axis=0)], [labels],
                           [None], (32, 32))  # fmt: skip
    cfg = TrainingConfig(patch_shape=(32, 32), batch_size=2, steps=4, steps_per_epoch=2,
                         device="cpu", seed=seed)  # fmt: skip
    gen = iter_train(model, sampler, config=cfg, progress_every=progress_every)
    run_to_end(gen, lambda _: torch.rand(3))  # a consumer drawing from the global stream
    return model.network.state_dict()


def test_training_leaves_the_global_torch_state_and_is_reproducible():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _train(seed=5, progress_every=1)
    torch.set_rng_state(before)  # the consumer above drew from it on purpose
    b = _train(seed=5)  # a different consumer pattern must not change the run
    c = _train(seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.set_rng_state(before)
    image, labels = blobs((48, 48))
    model = dropout_model()
    lo, hi = percentile_range(image, model.normalization)
    sampler = PatchSampler([apply_range(image[None], lo, hi, channel_axis=0)], [labels],
                           [None], (32, 32))  # fmt: skip
    cfg = TrainingConfig(patch_shape=(32, 32), batch_size=2, steps=2, steps_per_epoch=2,
                         device="cpu")  # fmt: skip
    run_to_end(iter_train(model, sampler, config=cfg))
    assert torch.equal(torch.get_rng_state(), before)


def test_mc_dropout_is_seeded_locally():
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    model = dropout_model()
    cfg = InferenceConfig(device="cpu")
    torch.manual_seed(99)
    before = torch.get_rng_state()
    _, first, _ = mc_dropout(image, model, passes=3, config=cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    _, again, _ = mc_dropout(image, model, passes=3, config=cfg, seed=1)
    _, other, _ = mc_dropout(image, model, passes=3, config=cfg, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_torch_random_streams_continue_across_blocks():
    rand = TorchRandom(3, torch.device("cpu"))
    with rand.active():
        first = torch.rand(4)
    torch.rand(10)  # global draws in between do not shift the private stream
    with rand.active():
        second = torch.rand(4)
    with TorchRandom(3, torch.device("cpu")).active():
        expected = torch.rand(8)
    assert torch.equal(torch.cat([first, second]), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_random_on_cuda_keeps_the_global_cuda_state():
    device = torch.device("cuda")
    before = torch.cuda.get_rng_state(device)
    with TorchRandom(4, device).active():
        a = torch.rand(5, device=device)
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    with TorchRandom(4, device).active():
        assert torch.equal(torch.rand(5, device=device), a)
