"""This package's networks in one file that needs only torch, shipped in bioimage.io packages.

A bioimage.io consumer (``bioimageio.core``, and through it other tools) builds a
``pytorch_state_dict`` model by importing the architecture's source file on its own, without
napari-segtool installed, so this module imports nothing from the package. Its modules carry
the names and order of :class:`~napari_segtool.model.unet.UNet` and
:class:`~napari_segtool.model.resunet.ResUNet`, so their state dicts load into it unchanged;
``tests/model/test_bioimageio.py`` checks, for every registered architecture, that both give
the same outputs. It is written so ``torch.jit.script`` compiles it: the package's TorchScript
weights are this network, scripted, with the model's weights loaded.

napari-segtool itself never imports this file from a package: it reads a package's weights
alone (:func:`napari_segtool.model.bioimageio_package.read_package`).

Examples
--------
>>> import torch
>>> net = UNet(spatial_dims=2, depth=3, base_features=4).eval()
>>> net(torch.zeros(1, 1, 37, 21)).shape
torch.Size([1, 2, 37, 21])
"""

from __future__ import annotations

import math
from typing import List  # noqa: UP035 - TorchScript of older torch releases reads only typing's

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResUNet", "UNet"]


def _conv(spatial_dims: int, cin: int, cout: int, kernel: int, bias: bool) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=bias)


def _norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _pair(
    spatial_dims: int, norm: str, cin: int, cout: int, dropout: float, last_act: bool
) -> list[nn.Module]:
    """conv-norm-LeakyReLU, optional dropout, conv-norm(-LeakyReLU), named as in the package."""
    bias = norm == "none"
    layers: list[nn.Module] = [
        _conv(spatial_dims, cin, cout, 3, bias),
        _norm(norm, spatial_dims, cout),
        nn.LeakyReLU(0.01, inplace=True),
    ]
    if dropout > 0:
        layers.append((nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)(dropout))
    layers += [_conv(spatial_dims, cout, cout, 3, bias), _norm(norm, spatial_dims, cout)]
    if last_act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return layers


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, spatial_dims: int, norm: str, cin: int, cout: int, dropout: float):
        super().__init__(*_pair(spatial_dims, norm, cin, cout, dropout, True))


class ResBlock(nn.Module):
    """``act(body(x) + skip(x))``; ``skip`` projects with a 1x1 convolution where needed."""

    def __init__(self, spatial_dims: int, norm: str, cin: int, cout: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(*_pair(spatial_dims, norm, cin, cout, dropout, False))
        self.skip: nn.Module = nn.Identity()
        if cin != cout:
            self.skip = nn.Sequential(
                _conv(spatial_dims, cin, cout, 1, norm == "none"),
                _norm(norm, spatial_dims, cout),
            )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) over ``(B, C, [Z,] Y, X)`` tensors, giving logits.

    Any spatial size works: the input is padded by edge replication to a multiple of
    ``2 ** (depth - 1)`` and the output cropped back.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 4,
        base_features: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        residual: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        block = ResBlock if residual else ConvBlock
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.multiple = 2 ** (depth - 1)
        feats = [base_features * 2**level for level in range(depth)]
        deep = max(depth - 2, 0)  # dropout only in the two deepest levels
        self.encoders = nn.ModuleList()
        cin = in_channels
        for level, ch in enumerate(feats):
            drop = dropout if level >= deep and level > 0 else 0.0
            self.encoders.append(block(spatial_dims, norm, cin, ch, drop))
            cin = ch
        self.pool = (nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d)(2)
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            self.upsamples.append(up(feats[level], feats[level - 1], kernel_size=2, stride=2))
            ch = feats[level - 1]
            self.decoders.append(block(spatial_dims, norm, 2 * ch, ch, 0.0))
        self.head = _conv(spatial_dims, feats[0], out_channels, 1, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError("expected a (batch, channel, [z,] y, x) tensor")
        if x.shape[1] != self.in_channels:
            raise ValueError("the input has the wrong number of channels")
        spatial: List[int] = []  # noqa: UP006
        for d in range(2, x.dim()):
            spatial.append(x.shape[d])
        pads: List[int] = []  # noqa: UP006  # F.pad takes (before, after) pairs from the last axis backwards
        padded = False
        for d in range(len(spatial) - 1, -1, -1):
            after = (self.multiple - spatial[d] % self.multiple) % self.multiple
            pads += [0, after]
            padded = padded or after > 0
        if padded:
            x = F.pad(x, pads, mode="replicate")
        skips: List[torch.Tensor] = []  # noqa: UP006
        last = len(self.encoders) - 1
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < last:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.upsamples, self.decoders):  # noqa: B905 - TorchScript: no strict
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        x = self.head(x)
        if padded:
            for d in range(len(spatial)):
                x = x.narrow(d + 2, 0, spatial[d])
        return x


class ResUNet(UNet):
    """The U-Net with each level's two convolutions in a residual block (``resunet``)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 4,
        base_features: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__(
            spatial_dims, in_channels, out_channels, depth, base_features, norm, dropout, True
        )
