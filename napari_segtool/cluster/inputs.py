"""What a cluster run needs to know of an input file, checked before anything is submitted.

:func:`cluster_input` opens the file lazily (nothing is read), picks its one channel, checks
the shape, a region and a foreground mask, and returns the
:class:`~napari_segtool.cluster.run.ClusterInput` the workers segment. The command line
(``segment --scheduler``) and the Segment widget both build their inputs here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_segtool.errors import InputError

__all__ = ["cluster_input", "image_shape", "mask_spec"]


def _channel(path: Path, image: Any, channel_axis: int | None,
             rgb: bool) -> tuple[tuple | None, tuple[int, ...]]:  # fmt: skip
    """The key picking the one channel of ``image`` (None when it has none) and the shape."""
    data = image.data
    axis = channel_axis if channel_axis is not None else image.channel_axis
    key = None
    if rgb or (image.rgb and channel_axis is None):
        raise InputError(f"{path}: a cluster run segments one-channel images (this one is RGB)")
    if axis is not None:
        if not -data.ndim <= axis < data.ndim or data.shape[axis] != 1:
            raise InputError(f"{path}: a cluster run segments one-channel images; axis {axis} "
                             f"holds {data.shape[axis]} channels")  # fmt: skip
        k: list[Any] = [slice(None)] * data.ndim
        k[axis] = 0
        key = tuple(k)
    shape = tuple(int(n) for i, n in enumerate(data.shape) if key is None or i != axis % data.ndim)
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: shape {tuple(data.shape)} is not a (Z, Y, X) volume or a "
                         "(Y, X) image")  # fmt: skip
    return key, shape


def image_shape(path: Path, *, channel_axis: int | None = None,
                rgb: bool = False) -> tuple[int, ...]:  # fmt: skip
    """The one-channel shape a cluster run sees of ``path`` (opened lazily)."""
    from napari_segtool.io import read_image

    image = read_image(path, lazy=True)
    try:
        return _channel(path, image, channel_axis, rgb)[1]
    finally:
        image.close()


def cluster_input(
    path: str | Path,
    outputs: Mapping[str, str | Path],
    model: Any,
    *,
    channel_axis: int | None = None,
    rgb: bool = False,
    region: Sequence[slice] | None = None,
    foreground_mask: str | Path | None = None,
) -> Any:
    """The :class:`~napari_segtool.cluster.run.ClusterInput` of one image file.

    Parameters
    ----------
    path : str or Path
        Anything :func:`~napari_segtool.io.read_image` opens lazily; the workers open the
        same path, so it must be on storage they share.
    outputs : mapping
        ``"labels"`` (required), ``"uncertainty"``, ``"probabilities"`` -> ``.zarr`` paths.
    model : SegmentationModel
        A one-input-channel model.
    channel_axis, rgb
        As for ``segment``: which axis holds the (single) channel; RGB is refused.
    region : sequence of slice, optional
        A box of the image's voxels (checked by the caller): only it is segmented, and the
        outputs carry its translation.
    foreground_mask : str or Path, optional
        A mask over the image's field of view (:func:`mask_spec`).
    """
    from napari_segtool.cluster.run import ClusterInput
    from napari_segtool.cluster.tasks import ImageSpec
    from napari_segtool.io import read_image

    path = Path(path)
    if "labels" not in outputs:
        raise InputError("a cluster run needs a labels output")
    if model.config.in_channels != 1:
        raise InputError(f"model {model.name!r} takes {model.config.in_channels} channels; "
                         "a cluster run segments one-channel images")  # fmt: skip
    image = read_image(path, lazy=True)
    try:
        key, full = _channel(path, image, channel_axis, rgb)
        shape, box = full, None
        if region is not None:
            if len(region) != len(full) or any(
                not 0 <= s.start < s.stop <= n for s, n in zip(region, full, strict=True)
            ):
                raise InputError(f"region {region} is not a box inside the image {full}")
            box = tuple((int(s.start), int(s.stop)) for s in region)
            shape = tuple(b - a for a, b in box)
        spec = ImageSpec(str(path), key, box)
        spacing = tuple(image.spacing) if len(image.spacing) == len(shape) else None
        mask = None
        if foreground_mask is not None:
            mask = mask_spec(Path(foreground_mask), full, image, box)
        translation = None
        if box is not None and spacing is not None:
            translation = tuple(a * s for (a, _), s in zip(box, spacing, strict=True))
        return ClusterInput(spec, shape, {k: Path(v) for k, v in outputs.items()},
                            spacing=spacing, unit=image.unit, translation=translation,
                            foreground=mask)  # fmt: skip
    finally:
        image.close()


def mask_spec(path: Path, image_shape: tuple[int, ...], image: Any,
                    region: Any) -> Any:  # fmt: skip
    """The :class:`~napari_segtool.cluster.tasks.MaskSpec` of ``path`` for an input of
    one-channel ``image_shape`` (``image`` its file, for the field of view).

    The mask must have the image's spatial axes, at most its size per axis in voxels, and
    where both files give a voxel size, the same extent (shape times spacing) to within one
    mask voxel per axis: otherwise it does not cover the same field of view.
    """
    from napari_segtool.cluster.tasks import MaskSpec
    from napari_segtool.io import read_image

    mask = read_image(path, lazy=True)
    try:
        shape = tuple(int(n) for n in mask.data.shape)
        if len(shape) != len(image_shape) or (mask.axes and set(mask.axes) - set("ZYX")):
            raise InputError(f"--foreground-mask {path}: shape {shape} is not a mask of the "
                             f"image's {len(image_shape)} spatial axes {image_shape}")  # fmt: skip
        if any(m > n for m, n in zip(shape, image_shape, strict=True)):
            raise InputError(f"--foreground-mask {path}: {shape} has more voxels than the image "
                             f"{image_shape} on some axis; give it at the image's resolution "
                             "or coarser")  # fmt: skip
        _check_extent(path, shape, mask, image_shape, image)
    finally:
        mask.close()
    offset = (0,) * len(image_shape) if region is None else tuple(a for a, _ in region)
    return MaskSpec(str(path), tuple(image_shape), shape, offset)


def _check_extent(path: Path, shape: tuple[int, ...], mask: Any, image_shape: tuple[int, ...],
                  image: Any) -> None:  # fmt: skip
    """Refuse a mask whose recorded extent differs from the image's (when both record one)."""
    m_sp, i_sp = tuple(mask.spacing or ()), tuple(image.spacing or ())
    if len(m_sp) != len(shape) or len(i_sp) != len(image_shape):
        return
    if all(v == 1.0 for v in m_sp) and shape != tuple(image_shape):
        return  # a mask without a voxel size: its voxels are stretched to the image's
    if mask.unit and image.unit and mask.unit != image.unit:
        return  # different units: not comparable here
    for axis, (m, msp, n, isp) in enumerate(zip(shape, m_sp, image_shape, i_sp, strict=True)):
        if abs(m * msp - n * isp) > msp + 1e-6 * n * isp:
            raise InputError(
                f"--foreground-mask {path}: axis {axis} spans {m} x {msp:g} = {m * msp:g} but "
                f"the image's spans {n} x {isp:g} = {n * isp:g}; the mask must cover the same "
                "field of view"
            )
