"""Where an image keeps its channels: the axis order the tiler needs, checked early."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = ["channels_first"]


def channels_first(
    image: NDArray, spatial_dims: int, in_channels: int, channel_axis: int | None, rgb: bool | None
) -> tuple[NDArray, int | None]:
    """Return the image with channels last moved first (or None) and its channel axis."""
    if rgb is None:
        rgb = (
            channel_axis is None
            and image.ndim == 3
            and image.shape[-1] in (3, 4)
            and (image.shape[0] > 4)
        )
    if rgb:
        if image.shape[-1] not in (3, 4):
            raise InputError(
                f"an RGB image needs 3 or 4 values on its last axis, got {image.shape}"
            )
        channel_axis = image.ndim - 1
    if channel_axis is not None:
        ca = channel_axis % image.ndim
        image = np.moveaxis(image, ca, 0)
        spatial = image.ndim - 1
        channels = image.shape[0]
        if rgb and channels == 4 and in_channels == 3:
            image, channels = image[:3], 3  # drop alpha
    else:
        spatial = image.ndim
        channels = 1
    if spatial > 3:
        raise InputError(
            f"image of shape {image.shape} has {spatial} spatial axes; napari-segtool handles "
            "(Y, X) and (Z, Y, X). For a time series or a multichannel stack say which axis holds "
            "channels (channel_axis / --channel-axis) or pick one time point"
        )
    if spatial < 2:
        raise InputError(f"image of shape {image.shape} has fewer than 2 spatial axes")
    if channels != in_channels:
        raise InputError(
            f"the model expects {in_channels} input channel(s) but the image has {channels} "
            f"(shape {image.shape}{', RGB' if rgb else ''}); pick a model made for "
            f"{channels}-channel images or convert the image"
        )
    if spatial_dims == 3 and spatial == 2:
        pass  # a 3D model on one plane: treated as a 1-slice stack
    return image, (0 if channel_axis is not None else None)
