"""``segment`` (tiled inference on a file) and ``evaluate`` (metrics against a reference)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_segtool.cli._common import (
    TerminalProgress,
    add_precision_flag,
    check_grid,
    check_output,
    emit,
    finite,
    image_outputs,
    logger,
    read_labels_file,
    spacing,
    tile_shape,
    write_json,
)
from napari_segtool.config import DEVICES, InferenceConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from napari_segtool.inference import Segmentation
    from napari_segtool.io.tiff import ImageFile
    from napari_segtool.model import SegmentationModel


def add_parsers(sub: Any) -> None:
    """Add ``segment`` and ``evaluate`` to the subcommands."""
    defaults = InferenceConfig()
    seg = sub.add_parser("segment", help="segment an image file with a U-Net")
    seg.add_argument("image", type=Path, help="input image: TIFF, NIfTI, NRRD, MetaImage, a "
                     "folder of DICOM slices (FOLDER::SERIESUID for one of several); PNG/JPEG "
                     "for 2D")  # fmt: skip
    seg.add_argument("-o", "--output", type=Path, required=True,
                     help="labels to write: .tif, or .nii.gz/.nii/.nrrd/.nhdr/.mha/.mhd with "
                     "the input's spacing, origin and direction")  # fmt: skip
    seg.add_argument(
        "-m", "--model", default="em-membranes-2d",
        help="bundled model name (see `napari-segtool models`) or a model file",
    )  # fmt: skip
    seg.add_argument("--device", choices=DEVICES, default=defaults.device)
    seg.add_argument("--tile-shape", type=tile_shape, default=None,
                     help="spatial tile, e.g. 256,256 (default: the model's)")  # fmt: skip
    seg.add_argument("--overlap", type=float, default=defaults.overlap)
    seg.add_argument("--batch-size", type=int, default=defaults.batch_size)
    seg.add_argument("--blend", choices=("gaussian", "constant"), default=defaults.blend)
    add_precision_flag(seg, compile_flag=True)
    seg.add_argument("--no-amp", action="store_true", help="the same as --precision fp32")
    seg.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    seg.add_argument("--uncertainty", type=Path, help="with --tta: write the uncertainty TIFF")
    seg.add_argument("--probabilities", type=Path, help="write class probabilities (C, ...)")
    seg.add_argument(
        "--channel-axis", type=int, default=None, help="axis of the image that holds channels"
    )
    seg.add_argument("--rgb", action="store_true", help="the last axis holds RGB channels")
    seg.set_defaults(run=cmd_segment)

    ev = sub.add_parser("evaluate", help="compare a label image with a reference")
    ev.add_argument("pred", type=Path, help="label image to judge (TIFF, NIfTI, NRRD, MHA)")
    ev.add_argument("ref", type=Path, help="reference label image (TIFF, NIfTI, NRRD, MHA)")
    ev.add_argument(
        "--spacing",
        type=spacing,
        default=None,
        help="voxel size Z,Y,X (default: from the reference file: TIFF metadata, or the "
        "header of a medical image, in mm)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--no-distances", action="store_true", help="skip HD, HD95 and ASSD")
    ev.add_argument("--per-slice", action="store_true", help="add overlap metrics per slice")
    ev.add_argument("-o", "--output", type=Path, help="also write the metrics to this .json file")
    ev.set_defaults(run=cmd_evaluate)


def _channels(args: argparse.Namespace, image: ImageFile, model: SegmentationModel):
    """``(rgb, channel_axis)`` from the flags and the axes the file declares."""
    rgb = True if args.rgb else (image.rgb if args.channel_axis is None else None)
    channel_axis = args.channel_axis if args.channel_axis is not None else image.channel_axis
    n_in = model.config.in_channels
    if args.channel_axis is None and image.channel_axis is not None and n_in == 1:
        raise InputError(
            f"{args.image}: the file declares axes {image.axes} "
            f"({image.data.shape[image.channel_axis]} channels) but model {model.name!r} takes "
            f"1 channel; if the file is a Z stack, save it again with metadata={{'axes': 'ZYX'}} "
            "(tifffile.imwrite(..., imagej=True) declares a 3D array as channels otherwise), or "
            "pick one channel"
        )
    return rgb, None if rgb else channel_axis


def _write_outputs(args: argparse.Namespace, image: ImageFile, result: Segmentation) -> None:
    from napari_segtool.io import write_image

    same = len(image.spacing) == result.labels.ndim
    # medical outputs get the input's whole geometry, so they overlay it in other tools
    geometry = {"spacing": image.spacing if same else None, "unit": image.unit,
                "origin": image.origin if same else None,
                "direction": image.direction if same else None}  # fmt: skip
    write_image(args.output, result.labels, **geometry)
    if args.uncertainty is not None and result.uncertainty is not None:
        write_image(args.uncertainty, result.uncertainty, **geometry)
    if args.probabilities is not None and result.probabilities is not None:
        probs = result.probabilities  # (C, *spatial): a channel axis, then the image's spacing
        axes = "C" + "ZYX"[-(probs.ndim - 1) :]
        write_image(args.probabilities, probs, axes=axes, **geometry)


def _progress(done: int, total: int, last: list[int]) -> None:
    pct = 100 * done // max(total, 1)
    if pct // 10 != last[0] // 10:
        logger.info("segmenting: %d / %d tiles", done, total)
    last[0] = pct


def cmd_segment(args: argparse.Namespace) -> int:
    from napari_segtool.inference import resolve_device, segment
    from napari_segtool.io import read_image
    from napari_segtool.model import load_model

    if args.uncertainty and not args.tta:
        raise InputError("--uncertainty needs --tta (the uncertainty comes from the flips)")
    for flag, path in (("-o", args.output), ("--uncertainty", args.uncertainty),
                       ("--probabilities", args.probabilities)):  # fmt: skip
        check_output(path, flag=flag, suffixes=image_outputs())
    resolve_device(args.device)  # fail before any work if the device is not there
    image = read_image(args.image)
    model = load_model(args.model)
    rgb, channel_axis = _channels(args, image, model)
    config = InferenceConfig(tile_shape=args.tile_shape, overlap=args.overlap, blend=args.blend,
                             batch_size=args.batch_size, device=args.device,
                             precision="fp32" if args.no_amp else args.precision,
                             compile=args.compile, tta=args.tta)  # fmt: skip
    t0 = time.perf_counter()
    last = [-1]
    with TerminalProgress("segment") as bar:

        def progress(done: int, total: int) -> None:
            _progress(done, total, last)
            bar.tiles(done, total)

        result = segment(
            image.data,
            model,
            config=config,
            channel_axis=channel_axis,
            rgb=rgb,
            return_probabilities=args.probabilities is not None,
            progress=progress,
        )
    _write_outputs(args, image, result)
    values = model.label_values or tuple(range(len(model.class_names)))
    emit({
        "output": str(args.output),
        "shape": list(result.labels.shape),
        "dtype": str(result.labels.dtype),
        "classes": {
            name: int(np.count_nonzero(result.labels == v))
            for v, name in zip(values, model.class_names, strict=False)
        },
        "device": result.device,
        "execution": result.execution,
        "seconds": round(time.perf_counter() - t0, 2),
    })  # fmt: skip
    return 0


def _print_metrics(result: dict[str, Any], unit: str) -> None:
    unit = f" {unit}" if unit else ""
    for key, value in result.items():
        if key in ("per_class", "per_slice"):
            continue
        if value is None:
            print(f"{key:<20} not computed")  # noqa: T201
            continue
        suffix = unit if key in ("hd", "hd95", "assd") else ""
        print(f"{key:<20} {value:.4f}{suffix}")  # noqa: T201
    for c, entry in result["per_class"].items():
        print(f"class {c}: dice {entry['dice']:.4f}  iou {entry['iou']:.4f}")  # noqa: T201


def cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_segtool.metrics import evaluate

    check_output(args.output, suffixes=(".json",))
    pred = read_labels_file(args.pred)
    ref = read_labels_file(args.ref)
    check_grid(ref, pred)  # medical files: the same voxels in space, not only the same shape
    voxel = args.spacing or ref.spacing  # a medical file's spacing is in mm
    if len(voxel) == 1:
        voxel = voxel * ref.data.ndim
    if len(voxel) != ref.data.ndim:
        raise InputError(
            f"--spacing has {len(voxel)} values for a {ref.data.ndim}D image; give one per axis"
        )
    result = evaluate(pred.data, ref.data, spacing=voxel, distances=not args.no_distances,
                      per_slice=args.per_slice)  # fmt: skip
    if args.output is not None:
        write_json(args.output, finite(result))
    if args.json:
        emit(result)
    else:
        _print_metrics(result, ref.unit)
    return 0
