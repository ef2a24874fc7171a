"""The architectures a model may use: each name maps to its network class and exact size.

A model file names its architecture in ``model_config["architecture"]`` (files written before
the name existed are ``"unet"``); loading looks the name up here, bounds the size with the
entry's ``state_size`` before anything is allocated, and builds the network with its
``network``. Adding an architecture means one module under ``model/``, a name in
:data:`napari_segtool.config.ARCHITECTURES` and an entry below; every network must keep
``config`` and a 1x1 output convolution named ``head`` (see
:func:`~napari_segtool.model.classes.extend_classes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from napari_segtool.config import ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.model import resunet, unet


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes
    ----------
    name : str
        The value of ``ModelConfig.architecture`` that selects it.
    description : str
        One line for model pickers and the README.
    network : callable
        ``network(config)`` builds the untrained network (a :class:`~.unet.UNet` subclass).
    state_size : callable
        ``state_size(config)``: the exact number of values in that network's ``state_dict``,
        computed without building it.
    """

    name: str
    description: str
    network: Callable[[ModelConfig], unet.UNet]
    state_size: Callable[[ModelConfig], int]


REGISTRY: Mapping[str, Architecture] = MappingProxyType({
    a.name: a
    for a in (
        Architecture(
            "unet",
            "U-Net: two 3x3(x3) convolutions per level (Ronneberger et al. 2015)",
            unet.UNet,
            unet.state_size,
        ),
        Architecture(
            "resunet",
            "residual U-Net: each level's two convolutions in a residual block (ResNet-style)",
            resunet.ResUNet,
            resunet.state_size,
        ),
    )
})  # fmt: skip
"""Registered architectures by name, in :data:`~napari_segtool.config.ARCHITECTURES` order."""


def architecture(name: str) -> Architecture:
    """The registered architecture called ``name``.

    Raises
    ------
    InputError
        For a name that is not registered; the message lists the known names.

    Examples
    --------
    >>> architecture("resunet").name
    'resunet'
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown architecture {name!r}: known architectures are {', '.join(REGISTRY)}"
        ) from None


def state_size(config: ModelConfig) -> int:
    """Exact number of values in the ``state_dict`` of the network ``config`` describes.

    Examples
    --------
    >>> cfg = ModelConfig(depth=2, base_features=4, architecture="resunet")
    >>> state_size(cfg) == sum(t.numel() for t in build_network(cfg).state_dict().values())
    True
    """
    return architecture(config.architecture).state_size(config)


def build_network(config: ModelConfig) -> unet.UNet:
    """An untrained network of the architecture ``config`` names (weights from torch's RNG).

    Raises
    ------
    InputError
        For an unregistered name, or a network above
        :data:`~napari_segtool.model.unet.MAX_STATE_SIZE` values.
    """
    return architecture(config.architecture).network(config)
