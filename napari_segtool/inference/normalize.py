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
    >>> _percentiles(s, (10.0, 99.8)) == tuple(np.percentile(s.astype(np.float64), [10, 99.8]))
    True
    >>> big = np.array([2**64 - 3, 2**64 - 1], np.uint64)  # no OverflowError
    >>> _percentiles(big, (0.0, 100.0)) == (float(2**64 - 3), float(2**64 - 1))
    True
    """
    if sample.dtype.kind in "biu" and sample.size:
        if sample.dtype.kind == "b":
            sample = sample.view(np.uint8)
        lo_v, hi_v = int(sample.min()), int(sample.max())
        if hi_v - lo_v < 2**17:
            flat = sample.reshape(-1)
            base = sample.dtype.type(lo_v)
            counts = np.zeros(hi_v - lo_v + 1, np.int64)
            for start in range(0, flat.size, 1 << 18):  # chunks: no sample-sized intp copy
                # subtract in the image's own dtype (exact: every value is >= the minimum), so
                # uint64 near 2**64 or int64 near -2**63 never pass through a C long
                part = (flat[start : start + (1 << 18)] - base).astype(np.intp)
                counts += np.bincount(part, minlength=counts.size)
            cum = np.cumsum(counts)
            n = sample.size
            out = []
            for q in qs:
                rank = q / 100.0 * (n - 1)
                i = int(np.floor(rank))
                j = min(i + 1, n - 1)
                v_i = int(np.searchsorted(cum, i, side="right")) + lo_v
                v_j = int(np.searchsorted(cum, j, side="right")) + lo_v
                out.append(float(v_i) + float(v_j - v_i) * (rank - i))
            return out[0], out[1]
    a, b = np.percentile(sample.astype(np.float64), list(qs))
    return float(a), float(b)


def percentile_range(
    image: NDArray, normalization: NormalizationConfig, *, channel_axis: int | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel intensities at the lower and upper percentiles.

    Returns
    -------
    lo, hi : ndarray of float64, shape (C,)
        ``C`` is 1 without a channel axis. Where the percentiles coincide (a sparse image),
        the channel's minimum and maximum are used instead so the scale stays finite.

    Raises
    ------
    InputError
        When normalising with this range would not give usable float32 values (see
        :func:`check_range`).
    """
    chans = [image] if channel_axis is None else list(np.moveaxis(image, channel_axis, 0))
    lo = np.empty(len(chans), np.float64)
    hi = np.empty(len(chans), np.float64)
    for i, ch in enumerate(chans):
        a, b = _percentiles(_sample(ch), (normalization.lower, normalization.upper))
        if b <= a:
            a, b = float(ch.min()), float(ch.max())
        if b <= a:
            b = a + 1.0
        lo[i], hi[i] = a, b
        check_range(float(ch.min()), float(ch.max()), a, b)
    return lo, hi


# At least this many float64 steps between the percentiles: fewer means the image's values are
# too large for their spread (int64 near -2**62, uint64 near 2**64) and collapse to a few levels.
_MIN_STEPS = 2.0**12
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_range(vmin: float, vmax: float, lo: float, hi: float, *, what: str = "image") -> None:
    """Refuse a normalisation that would turn the image into garbage without saying so.

    Parameters
    ----------
    vmin, vmax : float
        The smallest and largest intensity of the image (one channel).
    lo, hi : float
        The intensities mapped to 0 and 1.

    Raises
    ------
    InputError
        If the intensities cannot be told apart in floating point at their magnitude (values
        near ``+-2**62``: they would all map to one value, an all-background result), or if
        the extremes map beyond float32 (values up to ``1e300`` against a percentile range of
        a few hundred).

    Examples
    --------
    >>> check_range(0.0, 255.0, 2.0, 250.0)
    >>> check_range(-(2.0**62), -(2.0**62) + 50, -(2.0**62), -(2.0**62) + 50)
    Traceback (most recent call last):
    ...
    napari_segtool.errors.InputError: image intensities between -4.612e+18 and ...
    """
    magnitude = max(abs(lo), abs(hi), np.finfo(np.float64).tiny)
    if not hi - lo >= _MIN_STEPS * np.spacing(magnitude):
        raise InputError(
            f"{what} intensities between {lo:.4g} and {hi:.4g} differ by too little for their "
            f"magnitude: in floating point they collapse to a few values and the result would "
            f"be all background; subtract an offset first (e.g. image - image.min()) or store "
            f"the image as a smaller integer type"
        )
    scale = hi - lo
    worst = max(abs(vmin - lo), abs(vmax - lo)) / scale
    if not np.isfinite(worst) or worst > _FLOAT32_MAX:
        raise InputError(
            f"{what} values from {vmin:.4g} to {vmax:.4g} are far outside its percentile range "
            f"[{lo:.4g}, {hi:.4g}] and overflow float32 when normalised; clip the outliers "
            f"first (e.g. numpy.clip(image, {lo:.4g}, {hi:.4g}))"
        )


def apply_range(
    image: NDArray, lo: NDArray, hi: NDArray, *, channel_axis: int = 0
) -> NDArray[np.float32]:
    """Map ``lo`` to 0 and ``hi`` to 1 per channel (no clipping), as float32.

    The arithmetic is in float64, a block at a time, so large integers and float64 images
    keep their precision until the result (within float32's range by :func:`check_range`) is
    stored.

    Raises
    ------
    InputError
        If a normalised value is not finite (a ``value_range`` that does not suit the image).
    """
    ca = channel_axis % image.ndim
    lo = np.asarray(lo, np.float64).reshape(-1)
    hi = np.asarray(hi, np.float64).reshape(-1)
    out = np.empty(image.shape, np.float32)
    axis = 0 if ca != 0 or image.ndim == 1 else 1
    n = image.shape[axis]
    row = max(1, image.size // max(n, 1))
    step = max(1, (1 << 22) // row)
    shape = [1] * image.ndim
    shape[ca] = -1
    lo_b = lo.reshape(shape)
    scale = (1.0 / (hi - lo)).reshape(shape)
    for start in range(0, n, step):
        index = [slice(None)] * image.ndim
        index[axis] = slice(start, start + step)
        block = np.asarray(image[tuple(index)], np.float64)
        block -= lo_b
        block *= scale
        with np.errstate(over="ignore"):  # reported below as one error, not a warning
            out[tuple(index)] = block
    if not np.isfinite(out).all():
        raise InputError(
            f"normalising the image with the range [{lo}, {hi}] gives non-finite values; clip "
            "the image to that range first or let the range come from the image itself"
        )
    return out
