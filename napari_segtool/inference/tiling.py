"""Sliding-window inference: tile grid, blend weights and stitching.

The engine works on a batch of independent images ``(N, C, *S)`` with any predictor callable
``(B, C, *tile) -> (B, C_out, *tile)``. Tiles from all ``N`` images are batched together (so a
stack of small slices fills each forward pass), computed on ``device`` and stitched on the CPU
into float32 accumulators, so accelerator memory is bounded by one batch of tiles.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.errors import InputError

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]
Preprocess = Callable[[NDArray], NDArray]


@dataclass(frozen=True)
class TileProgress:
    """Progress of a tiled run: ``done`` of ``total`` tiles computed."""

    done: int
    total: int


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``.

    Neighbouring tiles overlap by at least ``overlap * tile`` voxels; the last tile ends at
    ``size`` exactly. A tile at least as long as the axis gives the single start 0 (the image is
    padded to the tile).

    Examples
    --------
    >>> tile_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    >>> tile_starts(511, 256, 0.25)
    [0, 192, 255]
    >>> tile_starts(100, 256, 0.25)
    [0]
    """
    if tile >= size:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(n)]
    return sorted(set(starts))


@lru_cache(maxsize=16)
def _blend_weights_cached(tile_shape: tuple[int, ...], mode: str) -> NDArray[np.float32]:
    if mode == "constant":
        return np.ones(tile_shape, np.float32)
    w = np.ones((), np.float64)
    for t in tile_shape:
        sigma = 0.125 * t
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2.0
        g = np.exp(-0.5 * (x / sigma) ** 2)
        w = np.multiply.outer(w, g / g.max())
    w = np.maximum(w, 1e-4)  # corners are covered by one tile only; keep them well above 0
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def blend_weights(tile_shape: Sequence[int], mode: str = "gaussian") -> NDArray[np.float32]:
    """Per-voxel weight of a tile's prediction when overlapping tiles are averaged.

    ``"gaussian"``: a separable Gaussian with ``sigma = 0.125 * tile`` per axis, 1 at the centre,
    clipped below at 1e-4 (MONAI's default mode). ``"constant"``: all ones. Read-only.
    """
    return _blend_weights_cached(tuple(int(t) for t in tile_shape), mode)


def tile_grid(
    spatial: Sequence[int], tile: Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
    """Start corners of all tiles covering ``spatial`` (``tile`` no larger than the image)."""
    axes = [tile_starts(s, t, overlap) for s, t in zip(spatial, tile, strict=True)]
    return list(itertools.product(*axes))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def iter_sliding_window(
    images: NDArray,
    predictor: Predictor,
    *,
    tile_shape: Sequence[int],
    out_channels: int,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    preprocess: Preprocess | None = None,
) -> Generator[TileProgress, None, NDArray[np.float32]]:
    """Apply ``predictor`` tile by tile and blend the tiles back into whole images.

    Parameters
    ----------
    images : ndarray, shape (N, C, *S)
        ``N`` independent images of spatial shape ``S`` (any dtype that ``preprocess`` turns into
        float32; without ``preprocess`` they must already be float32).
    predictor : callable
        Maps a float32 tensor ``(B, C, *tile_shape)`` on ``device`` to ``(B, out_channels,
        *tile_shape)``.
    tile_shape : sequence of int
        Spatial tile; axes where the image is smaller than the tile are padded by reflection for
        the predictor and cropped back.
    overlap : float
        Fraction in ``[0, 1)`` of a tile shared with its neighbour.
    blend : {"gaussian", "constant"}
        Weighting of overlapping predictions.
    batch_size : int
        Tiles per predictor call. On an out-of-memory error the batch is halved and retried;
        at a batch of one tile the error is re-raised as :class:`InputError`.
    device : torch.device or str
        Where tiles are sent; stitching always happens on the CPU.
    preprocess : callable, optional
        Applied to each batch of raw tiles ``(B, C, *tile)`` before the predictor, e.g. intensity
        normalisation, so the whole image is never copied.

    Yields
    ------
    TileProgress
        After each batch of tiles.

    Returns
    -------
    ndarray of float32, shape (N, out_channels, *S)
        The blended predictions (returned through ``StopIteration.value``; see
        :func:`sliding_window` for the plain-function form).
    """
    if images.ndim < 3:
        raise InputError(f"images must be (N, C, *spatial), got shape {images.shape}")
    spatial = tuple(images.shape[2:])
    tile = tuple(int(t) for t in tile_shape)
    if len(tile) != len(spatial):
        raise InputError(
            f"tile_shape {tile} has {len(tile)} axes but the image has {len(spatial)} spatial "
            f"axes {spatial}"
        )
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    eff_tile = tuple(min(t, s) for t, s in zip(tile, spatial, strict=True))
    pad = [(0, t - e) for t, e in zip(tile, eff_tile, strict=True)]
    needs_pad = any(p for _, p in pad)
    n = images.shape[0]
    grid = tile_grid(spatial, eff_tile, overlap)
    jobs = [(i, start) for i in range(n) for start in grid]
    weights = blend_weights(eff_tile, blend)
    # the weight sum is the same for every image and channel: one spatial map
    wsum = np.zeros(spatial, np.float32)
    for start in grid:
        region = tuple(slice(s, s + e) for s, e in zip(start, eff_tile, strict=True))
        wsum[region] += weights
    acc = np.zeros((n, out_channels, *spatial), np.float32)
    weighted = np.empty((out_channels, *eff_tile), np.float32)
    dev = torch.device(device)
    total = len(jobs)
    done = 0
    bs = batch_size
    pos = 0
    while pos < total:
        batch = jobs[pos : pos + bs]
        regions = [
            tuple(slice(s, s + e) for s, e in zip(start, eff_tile, strict=True))
            for _, start in batch
        ]
        raw = np.stack(
            [images[(i, slice(None), *r)] for (i, _), r in zip(batch, regions, strict=True)]
        )
        if needs_pad:
            raw = np.pad(
                raw,
                [(0, 0), (0, 0), *pad],
                mode="reflect" if _reflectable(eff_tile, pad) else "edge",
            )
        x = preprocess(raw) if preprocess is not None else raw
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        try:
            with torch.inference_mode():
                y = predictor(torch.from_numpy(np.ascontiguousarray(x)).to(dev))
                y_np = y.float().cpu().numpy()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if bs == 1:
                raise InputError(
                    f"out of {dev.type} memory even with one tile of shape {tile}; "
                    "use a smaller tile shape or device='cpu'"
                ) from exc
            bs = max(1, bs // 2)
            logger.warning("out of %s memory; retrying with batch size %d", dev.type, bs)
            continue
        if y_np.shape[1] != out_channels or y_np.shape[2:] != tile:
            raise InputError(
                f"predictor returned shape {y_np.shape}, expected "
                f"({len(batch)}, {out_channels}, *{tile})"
            )
        if needs_pad:
            y_np = y_np[(slice(None), slice(None), *(slice(0, e) for e in eff_tile))]
        for k, ((i, _), r) in enumerate(zip(batch, regions, strict=True)):
            np.multiply(y_np[k], weights, out=weighted)  # no temporary per tile
            acc[(i, slice(None), *r)] += weighted
        pos += len(batch)
        done += len(batch)
        yield TileProgress(done, total)
    acc /= wsum
    return acc


def _reflectable(eff_tile: Sequence[int], pad: Sequence[tuple[int, int]]) -> bool:
    # numpy reflect padding needs at least two voxels along a padded axis
    return all(e > 1 for e, (_, p) in zip(eff_tile, pad, strict=True) if p)


def run_to_end(gen: Generator[object, None, NDArray]) -> NDArray:
    """Exhaust a progress generator and return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def sliding_window(images: NDArray, predictor: Predictor, **kwargs: object) -> NDArray[np.float32]:
    """Plain-function form of :func:`iter_sliding_window` (same arguments, no progress)."""
    return run_to_end(iter_sliding_window(images, predictor, **kwargs))  # type: ignore[arg-type]
