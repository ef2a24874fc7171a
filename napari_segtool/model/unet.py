"""One U-Net class for 2D and 3D images, chosen by ``spatial_dims``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_segtool.config import ModelConfig
from napari_segtool.errors import InputError

MAX_STATE_SIZE = 100_000_000
"""Most values (weights and buffers) a U-Net may hold: 400 MB in float32."""


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(config: ModelConfig, channels: int) -> nn.Module:
    if config.norm == "batch":
        return (nn.BatchNorm2d if config.spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if config.norm == "instance":
        cls = nn.InstanceNorm2d if config.spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if config.norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


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
    k = 3**config.spatial_dims
    bias = config.norm == "none"
    per_norm = {"batch": 4, "instance": 2, "group": 2, "none": 0}[config.norm]

    def block(cin: int, cout: int) -> int:
        convs = cin * cout * k + cout * cout * k + (2 * cout if bias else 0)
        return convs + 2 * (per_norm * cout + (1 if config.norm == "batch" else 0))

    feats = config.features
    total = block(config.in_channels, feats[0])
    for level in range(1, config.depth):
        total += block(feats[level - 1], feats[level])  # encoder
        up = feats[level] * feats[level - 1] * 2**config.spatial_dims + feats[level - 1]
        total += up + block(2 * feats[level - 1], feats[level - 1])  # upsample and decoder
    return total + feats[0] * config.out_channels + config.out_channels  # head


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int, dropout: float = 0.0):
        conv = _conv(config.spatial_dims)
        bias = config.norm == "none"
        layers: list[nn.Module] = [
            conv(in_ch, out_ch, kernel_size=3, padding=1, bias=bias),
            _norm(config, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            drop = nn.Dropout2d if config.spatial_dims == 2 else nn.Dropout3d
            layers.append(drop(dropout))
        layers += [
            conv(out_ch, out_ch, kernel_size=3, padding=1, bias=bias),
            _norm(config, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        super().__init__(*layers)


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

    def __init__(self, config: ModelConfig):
        super().__init__()
        size = state_size(config)
        if size > MAX_STATE_SIZE:
            raise InputError(
                f"a U-Net with base_features={config.base_features}, depth={config.depth}, "
                f"spatial_dims={config.spatial_dims} has {size:,} weights "
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
            self.encoders.append(ConvBlock(config, in_ch, ch, drop))
            in_ch = ch
        pool = nn.MaxPool2d if config.spatial_dims == 2 else nn.MaxPool3d
        self.pool = pool(2)
        up = nn.ConvTranspose2d if config.spatial_dims == 2 else nn.ConvTranspose3d
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(config.depth - 1, 0, -1):
            self.upsamples.append(up(feats[level], feats[level - 1], kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(config, 2 * feats[level - 1], feats[level - 1]))
        self.head = _conv(config.spatial_dims)(feats[0], config.out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes that need no internal padding are multiples of this."""
        return 2 ** (self.config.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.config.spatial_dims
        if x.ndim != nd + 2:
            raise ValueError(
                f"UNet(spatial_dims={nd}) expects a (B, C, {'Z, ' if nd == 3 else ''}Y, X) "
                f"tensor, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet expects {self.config.in_channels} input channel(s), "
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
