"""Helpers the command modules share: flag types, output checks, JSON, label files, progress."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import numpy as np

from napari_segtool.config import BALANCE_MODES, FinetuneConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from tqdm import tqdm

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


def check_output(
    path: Path | None, *, flag: str = "-o", suffixes: Sequence[str] = (), overwrite: bool = False
) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    A path ending in ``.zarr`` names a store (a folder): an existing one is refused unless
    ``overwrite`` (``--overwrite``), and only a zarr store is ever replaced.

    Raises
    ------
    InputError
        If ``path`` is a folder (a store that exists, without ``overwrite``), has the wrong
        suffix, lies under a file, or is in a folder (or would be in a new folder under one)
        this user may not write to.
    """
    if path is None:
        return
    from napari_segtool.io.zarr_io import is_zarr_path

    if suffixes and not path.name.lower().endswith(tuple(suffixes)):  # also ".nii.gz"
        if path.is_dir():
            raise InputError(f"{flag} {path}: is a folder; name a file in it, e.g. {path / 'out'}")
        raise InputError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if is_zarr_path(path) and path.exists():
        if not _is_zarr_store(path):
            raise InputError(f"{flag} {path}: exists and is not a zarr store; name another path")
        if not overwrite:
            raise InputError(f"{flag} {path}: exists; pass --overwrite to replace it")
    elif path.is_dir():
        raise InputError(f"{flag} {path}: is a folder; name a file in it, e.g. {path / 'out'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: the file exists and is not writable")
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def _is_zarr_store(path: Path) -> bool:
    """A folder with zarr v3 or v2 metadata at its top."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")
    )


REGION_HELP = (
    "a box in voxels, z0:z1,y0:y1,x0:x1 (2D: y0:y1,x0:x1), stops exclusive, open ends "
    "allowed (:100, 20:, :)"
)


def parse_region(text: str, shape: Sequence[int], *, flag: str = "--region") -> tuple[slice, ...]:
    """``"z0:z1,y0:y1,x0:x1"`` as slices, checked against the image's spatial ``shape``.

    Examples
    --------
    >>> parse_region(" 2:5, :40,10:", (8, 64, 64))
    (slice(2, 5, None), slice(0, 40, None), slice(10, 64, None))

    Raises
    ------
    InputError
        One line: the wrong number of ranges, a range that is not ``start:stop`` in integers,
        or one that is empty or leaves the image.
    """
    shape = tuple(int(n) for n in shape)
    axes = "ZYX"[-len(shape) :] if len(shape) <= 3 else "?" * len(shape)
    form = ",".join(f"{a.lower()}0:{a.lower()}1" for a in axes)
    parts = text.split(",")
    if len(parts) != len(shape):
        raise InputError(
            f"{flag} {text!r}: give {len(shape)} ranges ({form}) for the image of shape {shape}"
        )
    out = []
    for axis, part, n in zip(axes, parts, shape, strict=True):
        bounds = part.strip().split(":")
        try:
            if len(bounds) != 2:
                raise ValueError(part)
            a = int(bounds[0]) if bounds[0].strip() else 0
            b = int(bounds[1]) if bounds[1].strip() else n
        except ValueError as exc:
            raise InputError(
                f"{flag} {text!r}: write each range as start:stop in voxels ({form}), "
                f"e.g. {','.join(['0:8'] * len(shape))}"
            ) from exc
        if not 0 <= a < b <= n:
            raise InputError(
                f"{flag} {text!r}: the {axis} range {a}:{b} is not a non-empty range inside "
                f"0:{n} (the image has shape {shape})"
            )
        out.append(slice(a, b))
    return tuple(out)


def image_outputs() -> tuple[str, ...]:
    """The endings an image or label output may have: TIFF and the medical formats."""
    from napari_segtool.io.medical import MEDICAL_SUFFIXES
    from napari_segtool.io.tiff import TIFF_SUFFIXES

    return TIFF_SUFFIXES + MEDICAL_SUFFIXES


def check_grid(a: ImageFile, b: ImageFile) -> None:
    """Refuse two files whose voxels are not the same physical points (medical formats,
    which record an origin and a direction; TIFFs are compared by shape only, elsewhere)."""
    from napari_segtool.io.medical import check_same_grid

    check_same_grid(a, b)


def write_json(path: Path, value: object) -> None:
    """Write a command's JSON result to ``path`` atomically (infinities as null)."""
    from napari_segtool.io import atomic_write

    data = (json.dumps(finite(value), indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def in_memory(image: ImageFile, *, purpose: str) -> ImageFile:
    """``image`` with its data read into memory (a zarr store or lazy TIFF), after a check
    that it fits: for the commands that hold whole arrays (training, simulation)."""
    if isinstance(image.data, np.ndarray):
        return image
    from dataclasses import replace

    from napari_segtool.io import check_allocation

    shape = tuple(int(n) for n in image.data.shape)
    dtype = np.dtype(image.data.dtype)
    check_allocation(
        math.prod(shape) * dtype.itemsize,
        what=f"{image.path}: {purpose} reads the {' x '.join(map(str, shape))} {dtype} array "
        "into memory, and it",
        hint="crop it first (napari-segtool segment --region works block by block; for "
        "training, give a crop of the image and its labels)",
    )
    data = np.asarray(image.data[...])
    image.close()
    return replace(image, data=data, levels=())


def read_labels_file(path: Path, *, lazy: bool = False) -> ImageFile:
    """Read a label image: integers, and only spatial axes (``Z, Y, X``).

    A zarr store is read into memory (checked first) unless ``lazy``; then its ``data`` is
    the ``zarr.Array``, read block by block by the caller.
    """
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
    return labels if lazy else in_memory(labels, purpose="reading the labels")


def read_labels(path: Path, *, grid: ImageFile | None = None) -> np.ndarray:
    """The label array of ``path`` in memory; with ``grid`` (the image), medical files must
    lie on the image's voxel grid (:func:`check_grid`)."""
    labels = read_labels_file(path)
    if grid is not None:
        check_grid(grid, labels)
    return labels.data


def read_mask(
    path: Path, shape: tuple[int, ...], *, flag: str = "--mask", grid: ImageFile | None = None
) -> np.ndarray:
    """An image file read as a bool mask (nonzero: True) of the labels' ``shape`` (and, for
    medical formats, on the voxel grid of ``grid``)."""
    from napari_segtool.io import read_image

    file = read_image(path)
    if grid is not None:
        check_grid(grid, file)
    if tuple(file.data.shape) != tuple(shape):
        raise InputError(
            f"{flag} {path}: shape {tuple(file.data.shape)} does not match the labels "
            f"{tuple(shape)}"
        )
    return in_memory(file, purpose="reading the mask").data != 0


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


def add_balance_flag(parser: argparse.ArgumentParser) -> None:
    """``--balance auto|off``: how a round treats rare foreground."""
    parser.add_argument(
        "--balance", choices=BALANCE_MODES, default="auto",
        help="auto: a class under 5 %% of the labelled voxels gets more patches centred on it, "
        "a heavier loss weight and up to 4x the steps (the plan is in the output); off: the "
        "fixed round",
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
        balance=getattr(args, "balance", "auto"),
        **extra,  # type: ignore[arg-type]
    )


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an open terminal (False for pipes, files and pytest's capture)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(desc: str, *, unit: str, total: int | None = None,
                 quiet: bool = False) -> tqdm:  # fmt: skip
    """A tqdm bar of ``unit`` (e.g. ``"tile"``) on stderr, drawn only when stderr is a
    terminal and ``quiet`` is False.

    Otherwise the bar is disabled: its methods do nothing and nothing is written, so a
    command's output stays the same in a pipe, a log file, under ``--json`` or in tests.
    """
    from tqdm import tqdm

    stream = sys.stderr
    return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                disable=quiet or not is_terminal(stream))  # fmt: skip


class TerminalProgress:
    """A command's progress on the terminal: one bar per phase of the work.

    Call it with what the core's generators yield (``run_to_end(gen, progress)``):
    :class:`~napari_segtool.training.StepProgress` advances a bar of training steps (its
    loss, and the last epoch's validation Dice from an
    :class:`~napari_segtool.training.EpochReport`, beside it);
    :class:`~napari_segtool.inference.Progress` a bar of tiles. :meth:`tiles` is the
    ``progress(done, total)`` callback of :func:`~napari_segtool.inference.segment`. A new
    phase (re-segmenting after a round) closes the previous bar. Use it as a context
    manager: while a bar is drawn, console log lines (``-v``) are written above it instead
    of through it, with the same text.
    """

    def __init__(self, command: str, *, quiet: bool = False) -> None:
        self.command = command
        self.quiet = quiet
        self.bar: tqdm | None = None
        self._unit = ""
        self._val_dice: float | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TerminalProgress:
        stream = sys.stderr
        console = any(isinstance(h, logging.StreamHandler) and h.stream is stream
                      for h in logging.root.handlers)  # fmt: skip
        if console and not self.quiet and is_terminal(stream):
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
        self._stack.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def advance(self, unit: str, done: int, total: int, postfix: str | None = None) -> None:
        """Advance the bar of ``unit`` to ``done`` of ``total``; another unit opens a new bar."""
        if self.bar is None or unit != self._unit:
            self.close()
            self._unit = unit
            self.bar = progress_bar(self.command, unit=unit, total=total, quiet=self.quiet)
        bar = self.bar
        bar.total = total
        if postfix is not None:
            bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)  # draws the bar (tqdm limits how often)

    def tiles(self, done: int, total: int) -> None:
        """Advance the bar of tiles to ``done`` of ``total``."""
        self.advance("tile", done, total)

    def write(self, line: str) -> None:
        """Print ``line`` on stdout above the bar (the bar is redrawn below it)."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)

    def __call__(self, item: object) -> None:
        from napari_segtool.inference import Progress
        from napari_segtool.training import EpochReport, StepProgress

        if isinstance(item, StepProgress):
            self.advance("step", item.step, item.total_steps, self._postfix(loss=item.loss))
        elif isinstance(item, EpochReport) and self.bar is not None:
            self._val_dice = item.val_dice
            self.bar.set_postfix_str(self._postfix(loss=item.train_loss))
        elif isinstance(item, Progress):
            self.tiles(item.done, item.total)

    def _postfix(self, *, loss: float) -> str:
        text = f"loss {loss:.4f}"
        if self._val_dice is not None:
            text += f", val Dice {self._val_dice:.4f}"
        return text
