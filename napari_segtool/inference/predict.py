"""Segment raw 2D images, RGB images and 3D stacks with a :class:`SegmentationModel`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.layout import channels_first
from napari_segtool.inference.normalize import apply_range, check_values, percentile_range
from napari_segtool.inference.outputs import (
    Outputs,
    Segmentation,
    argmax_channels,
    normalized_entropy,
)
from napari_segtool.inference.predictor import make_predictor, plan_network, resolve_device
from napari_segtool.inference.tiling import (
    TileProgress,
    iter_sliding_window,
    relay,
    run_to_end,
    tile_grid,
)
from napari_segtool.io.memory import check_allocation
from napari_segtool.model.checkpoint import SegmentationModel

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_VOXELS",
    "Progress",
    "Segmentation",
    "argmax_channels",
    "iter_segment",
    "make_predictor",
    "normalized_entropy",
    "resolve_device",
    "segment",
    "segment_memory",
]

# Slices of a stack handled per chunk by a 2D model: bounds the float32 accumulators to about
# this many voxels times the number of classes.
CHUNK_VOXELS = 4 * 512 * 512


@dataclass(frozen=True)
class Progress:
    """Progress of a segmentation: ``done`` of ``total`` tiles."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


SEGMENT_MEMORY_HINT = (
    "segment a crop or a few slices at a time, leave out the probabilities "
    "(--probabilities / return_probabilities), or process the volume block by block "
    "(a chunked zarr store) for larger-than-memory volumes"
)


def segment_memory(
    spatial: tuple[int, ...],
    *,
    spatial_dims: int,
    in_channels: int,
    n_classes: int,
    config: InferenceConfig | None = None,
    return_probabilities: bool = False,
) -> int:
    """Estimated peak bytes :func:`iter_segment` allocates for an image (the image excluded).

    Counts, in float32, the blended class scores and the blend-weight sum of one chunk (a
    2D model on a stack works on a few slices at a time, see ``CHUNK_VOXELS``), a float32
    copy of the chunk's image, and for the whole image the labels, the probabilities when
    asked for and, with test-time augmentation, the uncertainty and disagreement maps.

    Examples
    --------
    >>> segment_memory((512, 512), spatial_dims=2, in_channels=1, n_classes=2)
    4456448
    """
    cfg = config or InferenceConfig()
    volume = math.prod(spatial)
    if spatial_dims == 2 and len(spatial) == 3:
        plane = spatial[1] * spatial[2]
        chunk = max(cfg.batch_size, min(spatial[0], math.ceil(CHUNK_VOXELS / plane)))
        chunk_voxels, weight_voxels = min(chunk, spatial[0]) * plane, plane
    else:
        chunk_voxels = weight_voxels = volume
    n_out = n_classes + (1 if cfg.tta else 0)
    label_bytes = 1 if n_classes <= 256 else 2
    per_chunk = chunk_voxels * 4 * (n_out + in_channels) + weight_voxels * 4
    whole = volume * (label_bytes + (4 * n_classes if return_probabilities else 0))
    whole += volume * 8 if cfg.tta else 0
    return int(per_chunk + whole)


def iter_segment(
    image: NDArray,
    model: SegmentationModel,
    *,
    config: InferenceConfig | None = None,
    channel_axis: int | None = None,
    rgb: bool | None = None,
    return_probabilities: bool = False,
    value_range: tuple[NDArray, NDArray] | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Segment an image, yielding progress after every batch of tiles.

    Parameters
    ----------
    image : ndarray
        ``(Y, X)``, ``(Z, Y, X)``, RGB ``(Y, X, 3|4)``, or with ``channel_axis`` any of these
        with one channel axis. uint8, uint16, int16, other integers, bool or float.
    model : SegmentationModel
        A 2D model runs on a stack slice by slice; a 3D model runs on it natively (and on a 2D
        image as a one-slice stack).
    config : InferenceConfig, optional
        Tiling, device, mixed precision and test-time augmentation.
    channel_axis : int, optional
        Axis of ``image`` holding channels.
    rgb : bool, optional
        Treat the last axis as RGB channels; guessed when None (a 3D array whose last axis
        has 3 or 4 entries).
    return_probabilities : bool
        Also return the class probabilities (float32, ``n_classes`` times the image's size).
    value_range : (lo, hi), optional
        Intensities mapped to 0 and 1 (per channel, as from
        :func:`~napari_segtool.inference.normalize.percentile_range`). By default they come
        from this image's percentiles; pass the whole image's range when segmenting a crop so
        the crop is normalised like the whole.

    Yields
    ------
    Progress
        Tiles done so far out of the total, after each batch.

    Returns
    -------
    Segmentation
        The generator's return value (:func:`segment` and
        :func:`~napari_segtool.inference.tiling.run_to_end` hand it over); closing the
        generator cancels the run.

    Raises
    ------
    InputError
        For images that cannot be segmented (empty, constant, NaN, wrong channel count, too
        many axes) and for unusable options.
    """
    cfg = config or InferenceConfig()
    data, (lo, hi) = _input(image, model, channel_axis, rgb, value_range)
    spatial = data.shape[1:]
    tile = _tile_shape(cfg, model)
    _check_memory(spatial, model, data.shape[0], cfg, return_probabilities)
    device = resolve_device(cfg.device)
    n_out = model.config.out_channels + (1 if cfg.tta else 0)

    def preprocess(raw: NDArray) -> NDArray:
        return apply_range(raw, lo, hi, channel_axis=1)

    items, chunks = _items_and_chunks(data, model.spatial_dims, cfg.batch_size)
    eff_tile = tuple(min(t, s) for t, s in zip(tile, items.shape[2:], strict=True))
    per_item = len(tile_grid(items.shape[2:], eff_tile, cfg.overlap))
    batches = sum(math.ceil((b - a) * per_item / cfg.batch_size) for a, b in chunks)
    flips = 2**model.spatial_dims if cfg.tta else 1
    batch_shape = (cfg.batch_size, data.shape[0], *tile)
    runner, execution = plan_network(
        model, device, cfg, calls=batches * flips, batch_shape=batch_shape
    )
    predictor = make_predictor(
        model, device, runner=runner, tta=cfg.tta, disagreement=cfg.tta, dropout=cfg.mc_dropout
    )
    outputs = Outputs.empty(items.shape, model, tta=cfg.tta, probabilities=return_probabilities)
    total = per_item * items.shape[0]
    for a, b in chunks:
        windows = iter_sliding_window(
            items[a:b],
            predictor,
            tile_shape=tile,
            out_channels=n_out,
            overlap=cfg.overlap,
            blend=cfg.blend,
            batch_size=cfg.batch_size,
            device=device,
            preprocess=preprocess,
            channels_last=execution.memory_format == "channels_last",
        )
        done = a * per_item

        def progress(step: TileProgress, done: int = done) -> Progress:
            return Progress(done + step.done, total)

        outputs.store(a, b, (yield from relay(windows, progress)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return outputs.result(spatial, str(device), execution.finish(runner))


def _input(
    image: NDArray,
    model: SegmentationModel,
    channel_axis: int | None,
    rgb: bool | None,
    value_range: tuple[NDArray, NDArray] | None,
) -> tuple[NDArray, tuple[NDArray, NDArray]]:
    """The image as ``(C, *spatial)``, checked, and the intensities mapped to 0 and 1."""
    net_cfg = model.config
    data, ch_axis = channels_first(
        np.asarray(image), net_cfg.spatial_dims, net_cfg.in_channels, channel_axis, rgb
    )
    check_values(data)
    if value_range is None:
        value_range = percentile_range(data, model.normalization, channel_axis=ch_axis)
    if ch_axis is None:
        data = data[np.newaxis]  # (C=1, *spatial)
    return data, value_range


def _tile_shape(cfg: InferenceConfig, model: SegmentationModel) -> tuple[int, ...]:
    tile = tuple(cfg.tile_shape or model.tile_shape)
    sd = model.spatial_dims
    if len(tile) != sd:
        raise InputError(
            f"tile_shape {tile} has {len(tile)} axes but the model is {sd}D; give "
            f"{'(Y, X)' if sd == 2 else '(Z, Y, X)'}"
        )
    return tile


def _check_memory(
    spatial: tuple[int, ...],
    model: SegmentationModel,
    in_channels: int,
    cfg: InferenceConfig,
    return_probabilities: bool,
) -> None:
    need = segment_memory(
        spatial,
        spatial_dims=model.spatial_dims,
        in_channels=in_channels,
        n_classes=model.config.out_channels,
        config=cfg,
        return_probabilities=return_probabilities,
    )
    what = f"segmenting a {' x '.join(map(str, spatial))} image"
    check_allocation(need, what=what, hint=SEGMENT_MEMORY_HINT)


def _items_and_chunks(
    data: NDArray, spatial_dims: int, batch_size: int
) -> tuple[NDArray, list[tuple[int, int]]]:
    """``(N, C, *S)`` items for the tiler and the ranges of items computed together.

    A 2D model on a stack: the slices are independent items, a few per chunk (see
    :data:`CHUNK_VOXELS`); otherwise one item (a 2D image for a 3D model is a 1-slice stack).
    """
    spatial = data.shape[1:]
    if spatial_dims == 2 and len(spatial) == 3:
        plane = spatial[1] * spatial[2]
        chunk = max(batch_size, min(spatial[0], math.ceil(CHUNK_VOXELS / plane)))
        chunks = [(z, min(z + chunk, spatial[0])) for z in range(0, spatial[0], chunk)]
        return np.moveaxis(data, 1, 0), chunks  # (Z, C, Y, X)
    items = data[np.newaxis]
    if spatial_dims == 3 and len(spatial) == 2:
        items = items[:, :, np.newaxis]  # one-slice stack
    return items, [(0, 1)]


def segment(
    image: NDArray,
    model: SegmentationModel,
    *,
    config: InferenceConfig | None = None,
    channel_axis: int | None = None,
    rgb: bool | None = None,
    return_probabilities: bool = False,
    progress: Callable[[int, int], None] | None = None,
    value_range: tuple[NDArray, NDArray] | None = None,
) -> Segmentation:
    """Plain-function form of :func:`iter_segment`; ``progress(done, total)`` is optional."""
    gen = iter_segment(
        image,
        model,
        config=config,
        channel_axis=channel_axis,
        rgb=rgb,
        return_probabilities=return_probabilities,
        value_range=value_range,
    )
    if progress is None:
        return run_to_end(gen)
    return run_to_end(gen, lambda p: progress(p.done, p.total))
