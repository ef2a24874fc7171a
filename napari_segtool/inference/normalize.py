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


def _percentiles(sample: NDArray, qs: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(sample, qs)`` (linear interpolation), from a histogram for integers.

    Sorting holds the interpreter lock for a long time; for integer samples with a modest
    range a ``bincount`` gives the same order statistics in a few milliseconds, which keeps
    the GUI responsive while a worker normalises a large image.

    >>> s = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.uint8)
    >>> _percentiles(s, (10.0, 99.8)) == tuple(np.percentile(s.astype(np.float32), [10, 99.8]))
    True
    """
    if sample.dtype.kind in "biu" and sample.size:
        lo_v, hi_v = int(sample.min()), int(sample.max())
        if hi_v - lo_v < 2**17:
            flat = sample.reshape(-1)
            counts = np.zeros(hi_v - lo_v + 1, np.int64)
            for start in range(0, flat.size, 1 << 18):  # chunks: no sample-sized intp copy
                part = flat[start : start + (1 << 18)].astype(np.intp)
                part -= lo_v
                counts += np.bincount(part, minlength=counts.size)
            cum = np.cumsum(counts)
            n = sample.size
            out = []
            for q in qs:
                rank = q / 100.0 * (n - 1)
                i = int(np.floor(rank))
                j = min(i + 1, n - 1)
                v_i = float(np.searchsorted(cum, i, side="right") + lo_v)
                v_j = float(np.searchsorted(cum, j, side="right") + lo_v)
                out.append(v_i + (v_j - v_i) * (rank - i))
            return out[0], out[1]
    a, b = np.percentile(sample.astype(np.float32), list(qs))
    return float(a), float(b)


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
        a, b = _percentiles(_sample(ch), (normalization.lower, normalization.upper))
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
