"""Helpers the command modules share: flag types, output checks, JSON, label files."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_segtool.config import FinetuneConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from napari_segtool.io.tiff import ImageFile

logger = logging.getLogger("napari_segtool")


def tile_shape(text: str) -> tuple[int, ...]:
    """``"256,256"`` (or ``"256x256"``) as a tuple of positive ints, for argparse."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: write the tile as e.g. 256,256") from exc
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: tile sizes must be positive integers")
    return shape


def spacing(text: str) -> tuple[float, ...]:
    """``"3,0.5,0.5"`` as a tuple of positive floats, for argparse."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: write the spacing as e.g. 3,0.5,0.5") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: spacing values must be positive")
    return values


def slices(text: str) -> tuple[int, ...]:
    """``"3,7,12"`` as a tuple of slice numbers >= 0, for argparse."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: write the slices as e.g. 3,7,12") from exc
    if min(values, default=0) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: slice numbers start at 0")
    return values


def finite(value: object) -> object:
    """JSON has no infinity: undefined distances (one mask empty) become null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def emit(value: object, *, indent: int | None = None) -> None:
    """Print a command's result as JSON on stdout (the command's output)."""
    print(json.dumps(finite(value), indent=indent))  # noqa: T201


def check_output(path: Path | None, *, flag: str = "-o", suffixes: Sequence[str] = ()) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    Raises
    ------
    InputError
        If ``path`` is a folder, has the wrong suffix, lies under a file, or is in a folder
        (or would be in a new folder under one) this user may not write to.
    """
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; name a file in it, e.g. {path / 'out'}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: the file exists and is not writable")
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def write_json(path: Path, value: object) -> None:
    """Write a command's JSON result to ``path`` atomically (infinities as null)."""
    from napari_segtool.io import atomic_write

    data = (json.dumps(finite(value), indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def read_labels_file(path: Path) -> ImageFile:
    """Read a label image: integers, and only spatial axes (``Z, Y, X``)."""
    from napari_segtool.io import read_image

    labels = read_image(path)
    if labels.axes and set(labels.axes) - set("ZYX"):
        raise InputError(
            f"{path}: the file declares axes {labels.axes} {labels.data.shape}, but a label "
            "image has only spatial axes (Z, Y, X); save it as a plain stack, e.g. with "
            "tifffile.imwrite(path, labels, photometric='minisblack', metadata={'axes': 'ZYX'}) "
            "(with imagej=True and no axes, tifffile declares a 3D array as channels)"
        )
    if labels.data.dtype.kind not in "biu":
        raise InputError(f"{path}: labels must be integers, not {labels.data.dtype}")
    return labels


def read_labels(path: Path) -> np.ndarray:
    return read_labels_file(path).data


def read_mask(path: Path, shape: tuple[int, ...], *, flag: str = "--mask") -> np.ndarray:
    """A TIFF read as a bool mask (nonzero: True) of the labels' ``shape``."""
    from napari_segtool.io import read_image

    mask = read_image(path).data != 0
    if mask.shape != tuple(shape):
        raise InputError(
            f"{flag} {path}: shape {mask.shape} does not match the labels {tuple(shape)}"
        )
    return mask


def check_learning_rate(lr: float | None) -> None:
    import math

    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--learning-rate {lr}: give a positive finite number, e.g. 5e-4")


def add_precision_flag(parser: argparse.ArgumentParser, *, compile_flag: bool = False) -> None:
    """``--precision`` (and, for inference, ``--compile``) with the package's defaults."""
    from napari_segtool.config import COMPILE_MODES, PRECISIONS

    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="network precision: auto (bf16 on CPUs with native bfloat16 or fp16 on CUDA, "
        "where a timed batch shows it faster), fp32, bf16 or fp16 (CUDA)",
    )  # fmt: skip
    if compile_flag:
        parser.add_argument(
            "--compile", choices=COMPILE_MODES, default="auto",
            help="torch.compile the network: auto (only when the job is long enough for the "
            "warm-up to pay back), on or off",
        )  # fmt: skip


def finetune_config(args: argparse.Namespace, **extra: object) -> FinetuneConfig:
    """The training flags shared by ``train`` and ``simulate``; fine-tuning (``--init``)
    defaults to a lower learning rate than training a new model."""
    return FinetuneConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch_shape=args.patch_shape,
        learning_rate=args.learning_rate or (5e-4 if args.init else 2e-3),
        device=args.device,
        precision=args.precision,
        **extra,  # type: ignore[arg-type]
    )
