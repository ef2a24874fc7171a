import pytest
import torch

from napari_segtool.config import ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.model import UNet
from napari_segtool.model.unet import MAX_STATE_SIZE, state_size

CASES = [
    # spatial_dims, depth, norm, in_channels, out_channels, spatial shape
    (2, 4, "batch", 1, 2, (64, 64)),
    (2, 4, "batch", 1, 2, (37, 51)),
    (2, 3, "instance", 3, 4, (33, 20)),
    (2, 1, "none", 2, 2, (5, 7)),
    (2, 5, "group", 1, 3, (17, 1)),
    (3, 3, "batch", 1, 2, (9, 20, 13)),
    (3, 4, "group", 2, 3, (16, 16, 16)),
    (3, 2, "instance", 1, 2, (1, 11, 12)),
]


@pytest.mark.parametrize(("dims", "depth", "norm", "cin", "cout", "shape"), CASES)
def test_forward_backward_any_size(dims, depth, norm, cin, cout, shape):
    torch.manual_seed(0)
    cfg = ModelConfig(
        spatial_dims=dims,
        depth=depth,
        base_features=4,
        norm=norm,
        in_channels=cin,
        out_channels=cout,
        dropout=0.1,
    )
    net = UNet(cfg)
    x = torch.randn(2, cin, *shape, requires_grad=True)
    y = net(x)
    assert y.shape == (2, cout, *shape)
    y.square().mean().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_eval_is_deterministic_and_batch_independent():
    torch.manual_seed(1)
    net = UNet(ModelConfig(depth=3, base_features=4, dropout=0.3)).eval()
    x = torch.randn(3, 1, 24, 24)
    with torch.inference_mode():
        full = net(x)
        single = net(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def test_features_double_per_level():
    assert ModelConfig(depth=4, base_features=16).features == (16, 32, 64, 128)


def test_wrong_input_rank_and_channels_are_explained():
    net = UNet(ModelConfig(spatial_dims=2, in_channels=3, depth=2, base_features=2))
    with pytest.raises(ValueError, match=r"expects a \(B, C, Y, X\)"):
        net(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="expects 3 input channel"):
        net(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"out_channels": 1}, "out_channels must be between 2"),
        ({"out_channels": 65536}, "out_channels must be between 2 .* and 256, got 65536"),
        ({"in_channels": 0}, "in_channels must be between 1 and 64"),
        ({"in_channels": 1000}, "in_channels must be between 1 and 64"),
        ({"base_features": 512}, "base_features must be between 1 and 256, got 512"),
        ({"base_features": 1.5}, "base_features must be an integer"),
        ({"depth": True}, "depth must be an integer"),
        ({"depth": 0}, "depth must be between"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize(("depth", "cin", "cout"), [(1, 1, 2), (3, 3, 5), (4, 2, 3)])
def test_state_size_counts_every_value_of_the_network(dims, norm, depth, cin, cout):
    cfg = ModelConfig(spatial_dims=dims, norm=norm, depth=depth, in_channels=cin,
                      out_channels=cout, base_features=4)  # fmt: skip
    built = sum(t.numel() for t in UNet(cfg).state_dict().values())
    assert state_size(cfg) == built


def test_a_huge_network_is_refused_before_it_is_allocated():
    # within every single bound, but 1.9 billion values (7.4 GiB) in all
    cfg = ModelConfig(base_features=256, depth=7)
    assert state_size(cfg) > 10 * MAX_STATE_SIZE
    with pytest.raises(InputError, match=r"lower base_features or depth"):
        UNet(cfg)
