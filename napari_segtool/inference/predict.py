"""Segment raw 2D images, RGB images and 3D stacks with a :class:`SegmentationModel`."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.normalize import apply_range, check_values, percentile_range
from napari_segtool.inference.tiling import (
    Predictor,
    iter_sliding_window,
    run_to_end,
    tile_grid,
)
from napari_segtool.io.memory import check_allocation
from napari_segtool.model.checkpoint import SegmentationModel

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`segment`.

    Attributes
    ----------
    labels : ndarray of uint8 (uint16, uint32 for label values beyond 255, 65535)
        The label value per voxel, the image's spatial shape: channel ``i``'s winners get
        ``model.label_values[i]`` (``i`` itself for models with values ``0 .. C-1``).
    probabilities : ndarray of float32 or None
        ``(n_classes, *spatial)`` class probabilities when asked for, one per output
        channel (channel ``i`` is label value ``model.label_values[i]``).
    uncertainty : ndarray of float32 or None
        With test-time augmentation: the predictive entropy of the flip-averaged probabilities
        divided by ``log(n_classes)``, so 0 is certain and 1 is uniform.
    device : str
        The device that ran the network.
    disagreement : ndarray of float32 or None
        With test-time augmentation: the share of flips whose class differs from the
        majority's (0: all agree; at most ``1 - 1/flips``), blended across tiles.
    """

    labels: NDArray
    probabilities: NDArray[np.float32] | None
    uncertainty: NDArray[np.float32] | None
    device: str
    disagreement: NDArray[np.float32] | None = None


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "mps"`` into a usable :class:`torch.device`.

    Raises
    ------
    InputError
        If an accelerator is asked for by name but is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' requested but this torch has no usable CUDA GPU; "
            "use device 'auto' or 'cpu'"
        )
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise InputError(
            "device 'mps' requested but Apple MPS is not available; use device 'auto' or 'cpu'"
        )
    if device not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
    return torch.device(device)


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    axes = list(range(2, 2 + spatial_dims))
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def make_predictor(
    model: SegmentationModel,
    device: torch.device,
    *,
    amp: bool = True,
    tta: bool = False,
    disagreement: bool = False,
    dropout: bool = False,
) -> Predictor:
    """A tile predictor returning softmax probabilities as float32.

    With ``tta`` the probabilities are averaged over every combination of spatial flips
    (4 in 2D, 8 in 3D). With ``disagreement`` (and ``tta``) one more channel is appended:
    the share of flips whose predicted class differs from the majority class (0 when all
    flips agree). With ``amp`` on CUDA the network runs under float16 autocast.
    """
    net = model.network.to(device).eval()
    if dropout:  # Monte Carlo dropout: sample a different sub-network per call
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d | torch.nn.Dropout3d):
                m.train()
    use_amp = amp and device.type == "cuda"
    flips = _flip_sets(model.spatial_dims) if tta else [()]
    n_classes = model.config.out_channels

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            total = None
            votes = None
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = torch.softmax(net(xi).float(), dim=1)
                if dims:
                    p = torch.flip(p, dims)
                total = p if total is None else total + p
                if disagreement:
                    v = torch.nn.functional.one_hot(p.argmax(1), n_classes).movedim(-1, 1)
                    votes = v.float() if votes is None else votes + v
        assert total is not None
        mean = total / len(flips) if len(flips) > 1 else total
        if not disagreement:
            return mean
        assert votes is not None
        dis = 1.0 - votes.amax(dim=1, keepdim=True) / len(flips)
        return torch.cat([mean, dis], dim=1)

    return predict


def _layout(
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
        Through ``StopIteration.value``; closing the generator cancels the run.

    Raises
    ------
    InputError
        For images that cannot be segmented (empty, constant, NaN, wrong channel count, too
        many axes) and for unusable options.
    """
    cfg = config or InferenceConfig()
    image = np.asarray(image)
    net_cfg = model.config
    data, ch_axis = _layout(image, net_cfg.spatial_dims, net_cfg.in_channels, channel_axis, rgb)
    check_values(data)
    if value_range is None:
        lo, hi = percentile_range(data, model.normalization, channel_axis=ch_axis)
    else:
        lo, hi = value_range
    if ch_axis is None:
        data = data[np.newaxis]  # (C=1, *spatial)
    spatial = data.shape[1:]
    tile = tuple(cfg.tile_shape or model.tile_shape)
    sd = net_cfg.spatial_dims
    if len(tile) != sd:
        raise InputError(
            f"tile_shape {tile} has {len(tile)} axes but the model is {sd}D; give "
            f"{'(Y, X)' if sd == 2 else '(Z, Y, X)'}"
        )
    check_allocation(
        segment_memory(
            spatial,
            spatial_dims=sd,
            in_channels=data.shape[0],
            n_classes=net_cfg.out_channels,
            config=cfg,
            return_probabilities=return_probabilities,
        ),
        what=f"segmenting a {' x '.join(map(str, spatial))} image",
        hint=SEGMENT_MEMORY_HINT,
    )
    device = resolve_device(cfg.device)
    predictor = make_predictor(
        model, device, amp=cfg.amp, tta=cfg.tta, disagreement=cfg.tta, dropout=cfg.mc_dropout
    )
    n_classes = net_cfg.out_channels
    n_out = n_classes + (1 if cfg.tta else 0)

    def preprocess(raw: NDArray) -> NDArray:
        return apply_range(raw, lo, hi, channel_axis=1)

    # arrange as (N, C, *S) items for the tiler
    if sd == 2 and len(spatial) == 3:
        items = np.moveaxis(data, 1, 0)  # (Z, C, Y, X): slices are independent images
        plane = spatial[1] * spatial[2]
        chunk = max(cfg.batch_size, min(spatial[0], math.ceil(CHUNK_VOXELS / plane)))
        chunks = [(z, min(z + chunk, spatial[0])) for z in range(0, spatial[0], chunk)]
    else:
        items = data[np.newaxis]
        if sd == 3 and len(spatial) == 2:
            items = items[:, :, np.newaxis]  # one-slice stack
        chunks = [(0, 1)]
    item_spatial = items.shape[2:]
    values = model.label_values or tuple(range(n_classes))
    top = max(values)
    label_dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    # channel index -> the user's label value (None when they are the same)
    lut = None if values == tuple(range(n_classes)) else np.asarray(values, label_dtype)
    labels = np.empty((items.shape[0], *item_spatial), label_dtype)
    probs = (
        np.empty((n_classes, items.shape[0], *item_spatial), np.float32)
        if return_probabilities
        else None
    )
    unc = np.empty((items.shape[0], *item_spatial), np.float32) if cfg.tta else None
    dis = np.empty((items.shape[0], *item_spatial), np.float32) if cfg.tta else None
    eff_tile = tuple(min(t, s) for t, s in zip(tile, item_spatial, strict=True))
    per_item = len(tile_grid(item_spatial, eff_tile, cfg.overlap))
    total = per_item * items.shape[0]
    done = 0
    for a, b in chunks:
        gen = iter_sliding_window(
            items[a:b],
            predictor,
            tile_shape=tile,
            out_channels=n_out,
            overlap=cfg.overlap,
            blend=cfg.blend,
            batch_size=cfg.batch_size,
            device=device,
            preprocess=preprocess,
        )
        try:
            while True:
                step = next(gen)
                yield Progress(done + step.done, total)
        except StopIteration as stop:
            out = stop.value
        finally:
            gen.close()
        done += (b - a) * per_item
        if dis is not None:
            dis[a:b] = out[:, n_classes]
            out = out[:, :n_classes]
        argmax_channels(out, out=labels[a:b])
        if lut is not None:
            labels[a:b] = lut[labels[a:b]]
        if probs is not None:
            probs[:, a:b] = np.moveaxis(out, 1, 0)
        if unc is not None:
            unc[a:b] = normalized_entropy(out, axis=1)
        del out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # back to the image's own spatial shape (drops the item axis or the one-slice axis)
    out_shape = spatial
    labels = labels.reshape(out_shape)
    if probs is not None:
        probs = probs.reshape((n_classes, *out_shape))
    if unc is not None:
        unc = unc.reshape(out_shape)
    if dis is not None:
        dis = dis.reshape(out_shape)
    return Segmentation(labels, probs, unc, str(device), dis)


def argmax_channels(probs: NDArray, *, out: NDArray) -> NDArray:
    """``argmax`` over axis 1 of ``(N, C, *S)`` written into ``out`` (any integer dtype).

    Unlike ``np.argmax(...).astype(...)`` it needs no int64 temporary the size of the
    output, only one float plane and one mask; ties go to the lower class, as in argmax.

    >>> p = np.array([[[0.2, 0.5, 0.5]], [[0.8, 0.5, 0.4]]], np.float32)[None]
    >>> argmax_channels(p[:, :, 0], out=np.empty((1, 3), np.uint8)).tolist()
    [[1, 0, 0]]
    """
    best = np.array(probs[:, 0], copy=True)
    out[...] = 0
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best
        out[better] = c
        np.copyto(best, probs[:, c], where=better)
    return out


def normalized_entropy(probabilities: NDArray, *, axis: int = 0) -> NDArray[np.float32]:
    """Entropy of class probabilities divided by ``log(n_classes)``: 0 certain, 1 uniform.

    Examples
    --------
    >>> import numpy as np
    >>> normalized_entropy(np.array([[1.0, 0.5], [0.0, 0.5]])).round(3)
    array([0., 1.], dtype=float32)
    """
    p = np.clip(probabilities, 1e-12, 1.0)
    n = probabilities.shape[axis]
    h = -(p * np.log(p)).sum(axis=axis)
    return (h / math.log(n)).astype(np.float32)


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
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        progress(p.done, p.total)
