"""A residual-block U-Net ("ResNet-style U-Net") for 2D and 3D images.

The encoder/decoder, padding, pooling, upsampling and head are :class:`~.unet.UNet`'s; only
the block at each level differs: its two 3x3(x3) convolutions are wrapped in a residual
connection (He et al. 2016), with a 1x1 convolution and normalisation projecting the input
where the channel count changes, as in the residual U-Nets of nnU-Net and MONAI.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from napari_segtool.config import ModelConfig
from napari_segtool.model.unet import (
    UNet,
    conv_class,
    conv_pair,
    conv_size,
    encoder_decoder_size,
    norm_layer,
    norm_size,
)


def state_size(config: ModelConfig) -> int:
    """Number of values in the ``state_dict`` of ``ResUNet(config)``, without building it.

    Examples
    --------
    >>> cfg = ModelConfig(spatial_dims=2, depth=3, base_features=4, architecture="resunet")
    >>> state_size(cfg) == sum(t.numel() for t in ResUNet(cfg).state_dict().values())
    True
    """

    def block(cin: int, cout: int) -> int:
        body = conv_size(config, cin, cout, 3) + conv_size(config, cout, cout, 3)
        body += 2 * norm_size(config, cout)
        skip = 0 if cin == cout else conv_size(config, cin, cout, 1) + norm_size(config, cout)
        return body + skip

    return encoder_decoder_size(config, block)


class ResBlock(nn.Module):
    """``act(norm(conv(act(norm(conv(x))))) + skip(x))``: two 3x3(x3) convolutions with a skip.

    ``skip`` is the identity when ``in_ch == out_ch`` and a 1x1 convolution followed by
    normalisation otherwise. Dropout, when asked for, sits between the two convolutions as in
    :class:`~.unet.ConvBlock`.
    """

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(*conv_pair(config, in_ch, out_ch, dropout, last_act=False))
        self.skip: nn.Module = nn.Identity()
        if in_ch != out_ch:
            conv = conv_class(config.spatial_dims)
            self.skip = nn.Sequential(
                conv(in_ch, out_ch, kernel_size=1, bias=config.norm == "none"),
                norm_layer(config, out_ch),
            )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResUNet(UNet):
    """U-Net with residual blocks for ``spatial_dims`` 2 or 3 (``architecture="resunet"``).

    Parameters
    ----------
    config : ModelConfig
        Architecture; ``config.architecture`` must be ``"resunet"``.

    Notes
    -----
    Shapes, padding of odd sizes, dropout and normalisation are as in
    :class:`~napari_segtool.model.unet.UNet`; the network has a ``head`` (the 1x1 output
    convolution) and ``config``, so :func:`~napari_segtool.model.classes.extend_classes` works
    on it unchanged.

    Examples
    --------
    >>> import torch
    >>> cfg = ModelConfig(spatial_dims=2, depth=3, base_features=4, architecture="resunet")
    >>> ResUNet(cfg).eval()(torch.zeros(1, 1, 37, 21)).shape
    torch.Size([1, 2, 37, 21])
    """

    architecture: ClassVar[str] = "resunet"
    block: ClassVar[type[nn.Module]] = ResBlock

    @staticmethod
    def state_size(config: ModelConfig) -> int:
        """Values in the ``state_dict`` of ``ResUNet(config)`` (see :func:`state_size`)."""
        return state_size(config)
