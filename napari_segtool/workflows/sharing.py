"""Sharing a model as a bioimage.io package: pick a test input, predict it, package, check.

:func:`export_bioimageio` is the one operation behind ``napari-segtool export``: it crops a
test input from an image (by default the bundled sample that suits the model), predicts it with
napari-segtool's own inference (float32, no test-time augmentation) so the package's expected
output is exactly what napari-segtool computes, writes the package
(:func:`napari_segtool.model.bioimageio_package.write_package`), runs bioimage.io's own checks
on it (:func:`~napari_segtool.model.bioimageio_package.check_package`) and only then moves it
into place: a package that fails them is never left at ``path``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import CheckpointError, InputError
from napari_segtool.inference import segment
from napari_segtool.io import read_image
from napari_segtool.io.atomic import atomic_path
from napari_segtool.model.bioimageio_package import (
    AUTHORS,
    LICENSE,
    PackageCheck,
    check_package,
    write_package,
)
from napari_segtool.model.checkpoint import SegmentationModel

__all__ = ["Exported", "crop_test_input", "default_test_image", "export_bioimageio"]

TEST_EDGE = 256
"""Largest test-input edge: 256 x 256 (or a 3D model's tile) keeps the package small."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_bioimageio` wrote.

    Attributes
    ----------
    path : Path
        The package.
    test_shape : tuple of int
        Shape of the test input, ``(1, C, [Z,] Y, X)``.
    check : PackageCheck or None
        bioimage.io's verdict (None when the checks were skipped).
    seconds : float
        Time taken, checks included.
    """

    path: Path
    test_shape: tuple[int, ...]
    check: PackageCheck | None
    seconds: float


def default_test_image(model: SegmentationModel) -> Path:
    """The bundled sample a test input is cropped from: the EM stack for single-channel 2D
    models, the CT crop for single-channel 3D ones.

    Raises
    ------
    InputError
        For a model with several input channels (no bundled sample has them).
    """
    from napari_segtool._sample_data import SAMPLE_DIR

    if model.config.in_channels != 1:
        raise InputError(
            f"model {model.name!r} reads {model.config.in_channels} channels and no bundled "
            "sample has them; give a test image with those channels (--test-image)"
        )
    return SAMPLE_DIR / ("isbi2012_em.tif" if model.spatial_dims == 2 else "ct_small.tif")


def crop_test_input(
    image: NDArray,
    model: SegmentationModel,
    *,
    channel_axis: int | None = None,
    slice_index: int | None = None,
) -> NDArray:
    """A centred crop of ``image`` the package's test input is made of, ``(C, [Z,] Y, X)``.

    A 2D model takes one slice of a stack: ``slice_index``, by default the middle of the
    model's held-out slices (``trained_on["held_out_slices"]``) or of the stack. Each spatial
    edge is at most the model's tile and :data:`TEST_EDGE`, rounded down to a multiple of
    ``2 ** (depth - 1)`` (the sizes the package declares).

    Raises
    ------
    InputError
        For a channel count the model does not read, a slice out of range, or an image
        smaller than ``2 ** (depth - 1)`` along an axis.

    Examples
    --------
    >>> from napari_segtool.config import ModelConfig
    >>> m = SegmentationModel.new(ModelConfig(depth=3, base_features=4))
    >>> crop_test_input(np.zeros((5, 300, 21)), m).shape
    (1, 256, 20)
    """
    cfg = model.config
    data = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
    if data.shape[0] != cfg.in_channels:
        raise InputError(
            f"test image has {data.shape[0]} channel(s), model {model.name!r} reads "
            f"{cfg.in_channels}"
        )
    if cfg.spatial_dims == 2 and data.ndim == 4:
        n = data.shape[1]
        if slice_index is None:
            held = model.trained_on.get("held_out_slices")
            ok = isinstance(held, list) and len(held) == 2 and 0 <= held[0] <= held[1] < n
            slice_index = (held[0] + held[1]) // 2 if ok else n // 2
        if not 0 <= slice_index < n:
            raise InputError(f"slice {slice_index}: the stack has slices 0 to {n - 1}")
        data = data[:, slice_index]
    if data.ndim - 1 != cfg.spatial_dims:
        raise InputError(
            f"test image of shape {image.shape}: a {cfg.spatial_dims}D model needs a "
            f"{'stack (Z, Y, X)' if cfg.spatial_dims == 3 else '2D image or a stack'}"
        )
    multiple = 2 ** (cfg.depth - 1)
    index: list[slice] = [slice(None)]
    for size, tile in zip(data.shape[1:], model.tile_shape, strict=True):
        edge = min(size, tile, TEST_EDGE) // multiple * multiple
        if edge < multiple:
            raise InputError(
                f"test image of shape {image.shape} is too small: the model needs at least "
                f"{multiple} voxels along each spatial axis"
            )
        start = (size - edge) // 2
        index.append(slice(start, start + edge))
    return np.ascontiguousarray(data[tuple(index)])


def export_bioimageio(
    model: SegmentationModel,
    path: str | os.PathLike[str],
    *,
    test_image: NDArray | None = None,
    channel_axis: int | None = None,
    slice_index: int | None = None,
    authors: Sequence[str] = AUTHORS,
    license: str = LICENSE,
    check: bool = True,
) -> Exported:
    """Write ``model`` as a bioimage.io package at ``path`` once it passes bioimage.io's checks.

    Parameters
    ----------
    model : SegmentationModel
        A model of a registered architecture.
    path : str or PathLike
        The package to write (``.zip``); replaced atomically, and only if the checks pass.
    test_image : ndarray, optional
        Raw image to crop the test input from (see :func:`crop_test_input`); default: the bundled
        sample from :func:`default_test_image`.
    channel_axis, slice_index : int, optional
        Passed to :func:`crop_test_input`.
    authors, license : optional
        The package's authors and the SPDX licence of its weights.
    check : bool
        Run ``bioimageio.core``'s model test before moving the package into place.

    Raises
    ------
    InputError
        For an unusable test image or a missing ``bioimageio`` extra.
    CheckpointError
        If the package fails the bioimage.io checks (``path`` is then left as it was).
    """
    start = time.perf_counter()
    out = Path(path)
    if test_image is None:
        test_image = read_image(default_test_image(model)).data
        channel_axis = None
    crop = crop_test_input(test_image, model, channel_axis=channel_axis, slice_index=slice_index)
    spatial = crop.shape[1:]
    config = InferenceConfig(
        tile_shape=spatial,
        batch_size=1,
        device="cpu",
        precision="fp32",
        compile="off",
        tta=False,
    )
    single = crop[0] if crop.shape[0] == 1 else crop
    result = segment(
        single,
        model,
        config=config,
        channel_axis=None if crop.shape[0] == 1 else 0,
        rgb=False,
        return_probabilities=True,
    )
    assert result.probabilities is not None
    test_input = crop[None].astype(np.float32)
    test_output = result.probabilities[None].astype(np.float32)
    verdict: PackageCheck | None = None
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="segtool-export-") as d:
        staged = write_package(
            model,
            Path(d) / "package.zip",
            test_input=test_input,
            test_output=test_output,
            authors=authors,
            license=license,
        )
        if check:
            verdict = check_package(staged)
            if not verdict.passed:
                why = "; ".join(verdict.errors[:3]) or verdict.status
                raise CheckpointError(
                    f"{out}: the package failed the bioimage.io checks ({why}); nothing written"
                )
        shutil.copyfile(staged, tmp)
    return Exported(out, test_input.shape, verdict, time.perf_counter() - start)
