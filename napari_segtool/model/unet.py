"""One U-Net class for 2D and 3D images, chosen by ``spatial_dims``.

Its encoder/decoder is shared: another architecture (:mod:`napari_segtool.model.resunet`)
subclasses :class:`UNet` with its own ``block`` and exact ``state_size``, and registers itself
in :mod:`napari_segtool.model.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_segtool.config import ModelConfig
from napari_segtool.errors import InputError

MAX_STATE_SIZE = 100_000_000
"""Most values (weights and buffers) a network may hold: 400 MB in float32."""


def conv_class(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def norm_layer(config: ModelConfig, channels: int) -> nn.Module:
    if config.norm == "batch":
        return (nn.BatchNorm2d if config.spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if config.norm == "instance":
        cls = nn.InstanceNorm2d if config.spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if config.norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def conv_size(config: ModelConfig, cin: int, cout: int, kernel: int) -> int:
    """Values in one convolution of this package's networks (a bias only without norm)."""
    return cin * cout * kernel**config.spatial_dims + (cout if config.norm == "none" else 0)


def norm_size(config: ModelConfig, channels: int) -> int:
    """Values in one normalisation layer: affine weights and, for batch norm, its buffers."""
    per_channel = {"batch": 4, "instance": 2, "group": 2, "none": 0}[config.norm]
    return per_channel * channels + (1 if config.norm == "batch" else 0)


def encoder_decoder_size(config: ModelConfig, block_size: Callable[[int, int], int]) -> int:
    """Values in a U-shaped network whose levels are blocks of ``block_size(cin, cout)`` values.

    Counts one block per encoder level, and per decoder level a 2x transposed convolution
    (with bias) and a block over the concatenated skip, then the 1x1 head (with bias).
    """
    feats = config.features
    total = block_size(config.in_channels, feats[0])
    for level in range(1, config.depth):
        total += block_size(feats[level - 1], feats[level])  # encoder
        up = feats[level] * feats[level - 1] * 2**config.spatial_dims + feats[level - 1]
        total += up + block_size(2 * feats[level - 1], feats[level - 1])  # upsample, decoder
    return total + feats[0] * config.out_channels + config.out_channels  # head


def state_size(config: ModelConfig) -> int:
    """Number of values in the ``state_dict`` of ``UNet(config)``, computed without building it.

    Counts weights, biases and normalisation buffers (running statistics, batch counters), so a
    model file can be checked against its stated architecture before anything is allocated:
    4 bytes per value in float32.

    Examples
    --------
    >>> cfg = ModelConfig(spatial_dims=2, depth=3, base_features=4)
    >>> state_size(cfg) == sum(t.numel() for t in UNet(cfg).state_dict().values())
    True
    """

    def block(cin: int, cout: int) -> int:
        convs = conv_size(config, cin, cout, 3) + conv_size(config, cout, cout, 3)
        return convs + 2 * norm_size(config, cout)

    return encoder_decoder_size(config, block)


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__(*conv_pair(config, in_ch, out_ch, dropout))


def conv_pair(
    config: ModelConfig, in_ch: int, out_ch: int, dropout: float = 0.0, *, last_act: bool = True
) -> list[nn.Module]:
    """conv-norm-LeakyReLU, optional dropout, conv-norm(-LeakyReLU): a level's two convolutions.

    Shared by :class:`ConvBlock` and the residual block (which adds its input before the last
    activation, so it asks for ``last_act=False``); the order fixes the weights' names.
    """
    conv = conv_class(config.spatial_dims)
    bias = config.norm == "none"
    layers: list[nn.Module] = [
        conv(in_ch, out_ch, kernel_size=3, padding=1, bias=bias),
        norm_layer(config, out_ch),
        nn.LeakyReLU(0.01, inplace=True),
    ]
    if dropout > 0:
        drop = nn.Dropout2d if config.spatial_dims == 2 else nn.Dropout3d
        layers.append(drop(dropout))
    layers += [
        conv(out_ch, out_ch, kernel_size=3, padding=1, bias=bias),
        norm_layer(config, out_ch),
    ]
    if last_act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return layers


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) for ``spatial_dims`` 2 or 3.

    Parameters
    ----------
    config : ModelConfig
        Architecture; see :class:`napari_segtool.config.ModelConfig`.

    Notes
    -----
    Input is ``(B, in_channels, [Z,] Y, X)`` and output ``(B, out_channels, [Z,] Y, X)`` logits
    of the same spatial shape. Any spatial size works: the input is padded by edge replication
    to a multiple of ``2 ** (depth - 1)`` and the output cropped back, so odd sizes such as
    511 x 237 need no care from the caller.

    Examples
    --------
    >>> import torch
    >>> from napari_segtool.config import ModelConfig
    >>> net = UNet(ModelConfig(spatial_dims=2, depth=3, base_features=4)).eval()
    >>> net(torch.zeros(1, 1, 37, 21)).shape
    torch.Size([1, 2, 37, 21])
    """

    architecture: ClassVar[str] = "unet"
    """The name this class is registered under (``ModelConfig.architecture``)."""
    block: ClassVar[type[nn.Module]] = ConvBlock
    """The block each level applies: ``block(config, in_ch, out_ch, dropout)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != self.architecture:
            raise InputError(
                f"{type(self).__name__} builds architecture {self.architecture!r}, the config "
                f"names {config.architecture!r}; build it with "
                "napari_segtool.model.registry.build_network(config)"
            )
        size = self.state_size(config)
        if size > MAX_STATE_SIZE:
            raise InputError(
                f"a {self.architecture} network with base_features={config.base_features}, "
                f"depth={config.depth}, spatial_dims={config.spatial_dims} has {size:,} weights "
                f"({size * 4 / 2**30:.1f} GiB); at most {MAX_STATE_SIZE:,} are allowed: "
                "lower base_features or depth"
            )
        self.config = config
        feats = config.features
        deep = max(config.depth - 2, 0)  # dropout only in the two deepest levels
        self.encoders = nn.ModuleList()
        in_ch = config.in_channels
        for level, ch in enumerate(feats):
            drop = config.dropout if level >= deep and level > 0 else 0.0
            self.encoders.append(self.block(config, in_ch, ch, drop))
            in_ch = ch
        pool = nn.MaxPool2d if config.spatial_dims == 2 else nn.MaxPool3d
        self.pool = pool(2)
        up = nn.ConvTranspose2d if config.spatial_dims == 2 else nn.ConvTranspose3d
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(config.depth - 1, 0, -1):
            self.upsamples.append(up(feats[level], feats[level - 1], kernel_size=2, stride=2))
            self.decoders.append(self.block(config, 2 * feats[level - 1], feats[level - 1]))
        self.head = conv_class(config.spatial_dims)(feats[0], config.out_channels, kernel_size=1)

    @staticmethod
    def state_size(config: ModelConfig) -> int:
        """Values in the ``state_dict`` of this class built from ``config`` (see module docs)."""
        return state_size(config)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes that need no internal padding are multiples of this."""
        return 2 ** (self.config.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.config.spatial_dims
        if x.ndim != nd + 2:
            axes = "Z, Y, X" if nd == 3 else "Y, X"
            raise ValueError(
                f"{type(self).__name__}(spatial_dims={nd}) expects a (B, C, {axes}) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.config.in_channels} input channel(s), "
                f"got {x.shape[1]} (tensor shape {tuple(x.shape)})"
            )
        spatial = x.shape[2:]
        m = self.size_multiple
        pad_after = [(-s) % m for s in spatial]
        if any(pad_after):
            # F.pad takes pairs from the last axis backwards
            pads: list[int] = []
            for p in reversed(pad_after):
                pads += [0, p]
            x = F.pad(x, pads, mode="replicate")
        skips = []
        for level, enc in enumerate(self.encoders):
            x = enc(x)
            if level < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.upsamples, self.decoders, strict=True):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        x = self.head(x)
        if any(pad_after):
            x = x[(..., *(slice(0, s) for s in spatial))]
        return x
