"""Validation of raw images and percentile intensity normalisation."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import NormalizationConfig
from napari_segtool.errors import InputError

# Percentiles are estimated from at most this many voxels per channel (a regular subsample),
# so normalising a 512^3 stack does not sort 134 million values.
PERCENTILE_SAMPLE = 2_000_000


def check_values(image: NDArray, *, what: str = "image") -> None:
    """Reject images that cannot be segmented, with a message that says why.

    Raises
    ------
    InputError
        For an empty array, a non-numeric dtype, NaN or infinite values, or a constant image.
    """
    if image.size == 0:
        raise InputError(f"{what} is empty (shape {image.shape})")
    if image.dtype.kind not in "biuf":
        raise InputError(
            f"{what} has dtype {image.dtype}; expected integers (uint8, uint16, int16, ...), "
            "floats or booleans"
        )
    if image.dtype.kind == "f":
        finite = np.isfinite(image)
        if not finite.all():
            bad = int(image.size - np.count_nonzero(finite))
            n_nan = int(np.count_nonzero(np.isnan(image)))
            raise InputError(
                f"{what} has {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} infinite); "
                "replace them first, e.g. numpy.nan_to_num(image, nan=image[finite].min())"
            )
    lo, hi = image.min(), image.max()
    if lo == hi:
        raise InputError(f"{what} is constant (every voxel is {lo}): there is nothing to segment")


def _sample(channel: NDArray) -> NDArray:
    flat = channel.reshape(-1)
    step = max(1, flat.size // PERCENTILE_SAMPLE)
    return flat[::step]


def percentile_range(
    image: NDArray, normalization: NormalizationConfig, *, channel_axis: int | None = None
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-channel intensities at the lower and upper percentiles.

    Returns
    -------
    lo, hi : ndarray of float32, shape (C,)
        ``C`` is 1 without a channel axis. Where the percentiles coincide (a sparse image),
        the channel's minimum and maximum are used instead so the scale stays finite.
    """
    chans = [image] if channel_axis is None else list(np.moveaxis(image, channel_axis, 0))
    lo = np.empty(len(chans), np.float32)
    hi = np.empty(len(chans), np.float32)
    for i, ch in enumerate(chans):
        sample = _sample(ch).astype(np.float32)
        a, b = np.percentile(sample, [normalization.lower, normalization.upper])
        if b <= a:
            a, b = float(ch.min()), float(ch.max())
        if b <= a:
            b = a + 1.0
        lo[i], hi[i] = a, b
    return lo, hi


def apply_range(
    image: NDArray, lo: NDArray, hi: NDArray, *, channel_axis: int = 0
) -> NDArray[np.float32]:
    """Map ``lo`` to 0 and ``hi`` to 1 per channel (no clipping), as float32."""
    shape = [1] * image.ndim
    shape[channel_axis] = -1
    lo_b = lo.reshape(shape)
    scale = (1.0 / (hi - lo)).astype(np.float32).reshape(shape)
    out = image.astype(np.float32, copy=True)
    out -= lo_b
    out *= scale
    return out
