"""The ``napari-segtool`` command line.

Subcommands: ``segment`` (headless tiled inference on a file), ``evaluate`` (metrics of a
label image against a reference), ``train`` (train or fine-tune a model on labels, optionally
only where a mask says they count), ``models`` (list bundled models), ``demo`` (napari with
the plugin and a sample). Errors print one line to stderr and
exit with status 2 (bad input) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_segtool.config import DEVICES, FinetuneConfig, InferenceConfig, ModelConfig
from napari_segtool.errors import InputError, SegtoolError

if TYPE_CHECKING:
    from napari_segtool.io.tiff import ImageFile

logger = logging.getLogger("napari_segtool")


def _tile_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: write the tile as e.g. 256,256") from exc
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: tile sizes must be positive integers")
    return shape


def _spacing(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: write the spacing as e.g. 3,0.5,0.5") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: spacing values must be positive")
    return values


def _finite(value: object) -> object:
    """JSON has no infinity: undefined distances (one mask empty) become null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _check_output(path: Path | None, *, flag: str = "-o", suffixes: Sequence[str] = ()) -> None:
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


def _write_json(path: Path, value: object) -> None:
    """Write a command's JSON result to ``path`` atomically."""
    from napari_segtool.io import atomic_write

    data = (json.dumps(value, indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def _read_labels_file(path: Path) -> ImageFile:
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


def build_parser() -> argparse.ArgumentParser:
    defaults = InferenceConfig()
    parser = argparse.ArgumentParser(
        prog="napari-segtool",
        description="Human-in-the-loop U-Net segmentation of 2D images and 3D stacks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an image file with a U-Net")
    seg.add_argument("image", type=Path, help="input image (TIFF; PNG/JPEG for 2D)")
    seg.add_argument("-o", "--output", type=Path, required=True, help="label TIFF to write")
    seg.add_argument(
        "-m", "--model", default="em-membranes-2d",
        help="bundled model name (see `napari-segtool models`) or a model file",
    )  # fmt: skip
    seg.add_argument("--device", choices=DEVICES, default=defaults.device)
    seg.add_argument(
        "--tile-shape",
        type=_tile_shape,
        default=None,
        help="spatial tile, e.g. 256,256 (default: the model's)",
    )
    seg.add_argument("--overlap", type=float, default=defaults.overlap)
    seg.add_argument("--batch-size", type=int, default=defaults.batch_size)
    seg.add_argument("--blend", choices=("gaussian", "constant"), default=defaults.blend)
    seg.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    seg.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    seg.add_argument("--uncertainty", type=Path, help="with --tta: write the uncertainty TIFF")
    seg.add_argument("--probabilities", type=Path, help="write class probabilities (C, ...)")
    seg.add_argument(
        "--channel-axis", type=int, default=None, help="axis of the image that holds channels"
    )
    seg.add_argument("--rgb", action="store_true", help="the last axis holds RGB channels")

    ev = sub.add_parser("evaluate", help="compare a label image with a reference")
    ev.add_argument("pred", type=Path, help="label image to judge (TIFF)")
    ev.add_argument("ref", type=Path, help="reference label image (TIFF)")
    ev.add_argument(
        "--spacing",
        type=_spacing,
        default=None,
        help="voxel size Z,Y,X (default: from the reference's TIFF metadata)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--no-distances", action="store_true", help="skip HD, HD95 and ASSD")
    ev.add_argument("--per-slice", action="store_true", help="add overlap metrics per slice")
    ev.add_argument("-o", "--output", type=Path, help="also write the metrics to this .json file")

    fdef = FinetuneConfig()
    tr = sub.add_parser("train", help="train or fine-tune a model on (partial) labels")
    tr.add_argument("image", type=Path, help="image (TIFF): 2D, RGB or a 3D stack")
    tr.add_argument(
        "labels",
        type=Path,
        help="training labels (TIFF): 0 background, any other values are classes (sparse ids "
        "such as 5, 117 train as that many classes and come back out as the same ids)",
    )
    tr.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="model file to write; an existing one is replaced only by a promoted model, "
        "otherwise the new model goes to NAME.rejected.pt beside it",
    )
    tr.add_argument("--init", help="start from this model (bundled name or file); default: new")
    tr.add_argument("--mask", type=Path, help="TIFF: nonzero where the labels count")
    tr.add_argument("--epochs", type=int, default=fdef.epochs)
    tr.add_argument("--steps-per-epoch", type=int, default=fdef.steps_per_epoch)
    tr.add_argument("--batch-size", type=int, default=fdef.batch_size)
    tr.add_argument("--patch-shape", type=_tile_shape, help="training patch, e.g. 256,256")
    tr.add_argument("--learning-rate", type=float, help="default: 5e-4 fine-tuning, 2e-3 new")
    tr.add_argument("--validation-fraction", type=float, default=fdef.validation_fraction)
    tr.add_argument("--patience", type=int, default=fdef.patience)
    tr.add_argument("--dims", type=int, choices=(2, 3), default=2, help="a new model's dims")
    tr.add_argument("--device", choices=DEVICES, default=fdef.device)
    tr.add_argument("--seed", type=int, default=fdef.seed)
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the training run saved in --init (epoch count, optimizer) to --epochs",
    )
    sim = sub.add_parser(
        "simulate", help="measure an active-learning strategy by simulated correction rounds"
    )
    sim.add_argument("image", type=Path, help="image (TIFF): a 3D stack or a 2D image")
    sim.add_argument("labels", type=Path, help="the full reference labels (TIFF)")
    sim.add_argument("--strategy", choices=("uncertainty", "random", "foreground-random"),
                     default="uncertainty")  # fmt: skip
    sim.add_argument(
        "--score",
        choices=("top", "mean"),
        default="top",
        help="unit score: mean of its 5 %% most uncertain voxels, or of all",
    )
    sim.add_argument("--init", help="starting model (bundled name or file); default: new 2D")
    sim.add_argument("--initial", type=int, default=2, help="units revealed at random first")
    sim.add_argument("--rounds", type=int, default=4)
    sim.add_argument("--per-round", type=int, default=2, help="units revealed per round")
    sim.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1")
    sim.add_argument("--tile", type=int, default=128, help="tile size of a 2D image's units")
    sim.add_argument("--held-out", type=float, default=0.3, help="fraction of units held out")
    sim.add_argument("--epochs", type=int, default=fdef.epochs)
    sim.add_argument("--steps-per-epoch", type=int, default=fdef.steps_per_epoch)
    sim.add_argument("--batch-size", type=int, default=fdef.batch_size)
    sim.add_argument("--patch-shape", type=_tile_shape)
    sim.add_argument("--learning-rate", type=float, help="default: 5e-4 with --init, else 2e-3")
    sim.add_argument("--device", choices=DEVICES, default=fdef.device)
    sim.add_argument("--json", action="store_true", help="print the curves as one JSON object")
    sim.add_argument("-o", "--output", type=Path, help="also write the curves to this .json file")
    sub.add_parser("models", help="list the bundled models").add_argument(
        "--json", action="store_true", help="print JSON"
    )

    demo = sub.add_parser("demo", help="open napari with the plugin and a sample loaded")
    demo.add_argument("--sample", choices=("isbi_em", "ct_small"), default="isbi_em")
    demo.add_argument("--screenshot", type=Path, help="save a window screenshot and exit")
    demo.add_argument("--segment", action="store_true", help="click Segment first")
    demo.add_argument(
        "--review", action="store_true", help="segment, dock Review and correct part of a slice"
    )
    demo.add_argument(
        "--finetune",
        action="store_true",
        help="also correct and review slices and run one Fine-tune round",
    )
    demo.add_argument("--project", type=Path, help="with --finetune: the project folder")
    return parser


def _cmd_segment(args: argparse.Namespace) -> int:
    from napari_segtool.inference import resolve_device, segment
    from napari_segtool.io import read_image, write_image
    from napari_segtool.model import load_model

    if args.uncertainty and not args.tta:
        raise InputError("--uncertainty needs --tta (the uncertainty comes from the flips)")
    for flag, path in (("-o", args.output), ("--uncertainty", args.uncertainty),
                       ("--probabilities", args.probabilities)):  # fmt: skip
        _check_output(path, flag=flag, suffixes=(".tif", ".tiff"))
    resolve_device(args.device)  # fail before any work if the device is not there
    image = read_image(args.image)
    model = load_model(args.model)
    # the axes the file declares decide colour and channels, as for every command
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
    config = InferenceConfig(
        tile_shape=args.tile_shape,
        overlap=args.overlap,
        blend=args.blend,
        batch_size=args.batch_size,
        device=args.device,
        amp=not args.no_amp,
        tta=args.tta,
    )
    t0 = time.perf_counter()
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // 10 != last[0] // 10:
            logger.info("segmenting: %d / %d tiles", done, total)
        last[0] = pct

    result = segment(
        image.data,
        model,
        config=config,
        channel_axis=None if rgb else channel_axis,
        rgb=rgb,
        return_probabilities=args.probabilities is not None,
        progress=progress,
    )
    spacing = image.spacing if len(image.spacing) == result.labels.ndim else None
    write_image(args.output, result.labels, spacing=spacing, unit=image.unit)
    if args.uncertainty is not None and result.uncertainty is not None:
        write_image(args.uncertainty, result.uncertainty, spacing=spacing, unit=image.unit)
    if args.probabilities is not None and result.probabilities is not None:
        probs = result.probabilities  # (C, *spatial): a channel axis, then the image's spacing
        axes = "C" + "ZYX"[-(probs.ndim - 1) :]
        write_image(args.probabilities, probs, spacing=spacing, unit=image.unit, axes=axes)
    values = model.label_values or tuple(range(len(model.class_names)))
    summary = {
        "output": str(args.output),
        "shape": list(result.labels.shape),
        "dtype": str(result.labels.dtype),
        "classes": {
            name: int(np.count_nonzero(result.labels == v))
            for v, name in zip(values, model.class_names, strict=False)
        },
        "device": result.device,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary))  # noqa: T201 - the command's output
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_segtool.metrics import evaluate

    _check_output(args.output, suffixes=(".json",))
    pred = _read_labels_file(args.pred)
    ref = _read_labels_file(args.ref)
    spacing = args.spacing or ref.spacing
    if len(spacing) == 1:
        spacing = spacing * ref.data.ndim
    if len(spacing) != ref.data.ndim:
        raise InputError(
            f"--spacing has {len(spacing)} values for a {ref.data.ndim}D image; give one per axis"
        )
    result = evaluate(
        pred.data,
        ref.data,
        spacing=spacing,
        distances=not args.no_distances,
        per_slice=args.per_slice,
    )
    if args.output is not None:
        _write_json(args.output, _finite(result))
    if args.json:
        print(json.dumps(_finite(result)))  # noqa: T201
        return 0
    unit = f" {ref.unit}" if ref.unit else ""
    for key, value in result.items():
        if key in ("per_class", "per_slice"):
            continue
        if value is None:
            print(f"{key:<20} not computed")  # noqa: T201
            continue
        suffix = unit if key in ("hd", "hd95", "assd") else ""
        print(f"{key:<20} {value:.4f}{suffix}")  # noqa: T201
    for c, entry in result["per_class"].items():  # type: ignore[union-attr]
        print(f"class {c}: dice {entry['dice']:.4f}  iou {entry['iou']:.4f}")  # noqa: T201
    return 0


def _read_labels(path: Path) -> np.ndarray:
    return _read_labels_file(path).data


def _finetune_config(args: argparse.Namespace, **extra: object) -> FinetuneConfig:
    """The training flags shared by ``train`` and ``simulate``; fine-tuning (``--init``)
    defaults to a lower learning rate than training a new model."""
    return FinetuneConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch_shape=args.patch_shape,
        learning_rate=args.learning_rate or (5e-4 if args.init else 2e-3),
        device=args.device,
        **extra,  # type: ignore[arg-type]
    )


def _cmd_train(args: argparse.Namespace) -> int:
    import math

    from napari_segtool.inference import resolve_device
    from napari_segtool.io import read_image
    from napari_segtool.model import SegmentationModel, load_model
    from napari_segtool.training.data import label_values_present
    from napari_segtool.training.finetune import LabelledImage, iter_finetune

    # options and the output path first: nothing is read or trained for a run that must fail
    lr = args.learning_rate
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--learning-rate {lr}: give a positive finite number, e.g. 5e-4")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: give a seed >= 0")
    out = args.output
    _check_output(out)
    config = _finetune_config(
        args,
        validation_fraction=args.validation_fraction,
        patience=args.patience,
        seed=args.seed,
    )
    resolve_device(args.device)
    image = read_image(args.image)
    labels = _read_labels(args.labels)
    mask = None
    if args.mask is not None:
        mask = read_image(args.mask).data != 0
        if mask.shape != labels.shape:
            raise InputError(
                f"--mask {args.mask}: shape {mask.shape} does not match the labels {labels.shape}"
            )
    if args.init:
        model = load_model(args.init)
        if args.resume and model.training_state is None:
            raise InputError(f"{args.init}: holds no training run to resume")
    else:
        if args.resume:
            raise InputError("--resume needs --init MODEL (the model file of the run to continue)")
        rgb = image.data.ndim == labels.ndim + 1
        values = label_values_present(labels, mask=mask)  # one channel per value present
        model = SegmentationModel.new(
            ModelConfig(
                spatial_dims=args.dims,
                in_channels=image.data.shape[-1] if rgb else 1,
                out_channels=len(values),
            ),
            seed=args.seed,
            name=out.stem,
            label_values=values,
        )
    gen = iter_finetune(
        model,
        [LabelledImage(image.data, labels, mask)],
        config=config,
        resume=args.resume,
        progress_every=None,
    )
    try:
        while True:
            report = next(gen)
            logger.info(
                "epoch %d/%d loss %.4f val dice %s",
                report.epoch,
                args.epochs,
                report.train_loss,
                "-" if report.val_dice is None else f"{report.val_dice:.4f}",
            )
    except StopIteration as stop:
        result = stop.value
    result.model.trained_on["files"] = {"image": str(args.image), "labels": str(args.labels)}
    # never replace an existing model with one that did not beat it: write it beside
    existed = out.exists()
    target = out
    if existed and not result.promote:
        target = out.with_name(f"{out.stem}.rejected{out.suffix or '.pt'}")
        logger.warning(
            "the trained model was not promoted (validation Dice %s, the starting model's "
            "%s): kept %s unchanged and wrote the new model to %s",
            result.best_dice,
            result.baseline_dice,
            out,
            target,
        )
    result.model.save(target)
    summary = {
        "output": str(target),
        "replaced": existed and target == out,
        "kept": None if target == out else str(out),
        "classes": result.model.config.out_channels,
        "label_values": list(result.model.label_values or ()),
        **result.summary(),
    }
    print(json.dumps(summary))  # noqa: T201 - the command's output
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from napari_segtool.active_learning import SimulationConfig, iter_simulate
    from napari_segtool.inference import resolve_device
    from napari_segtool.io import read_image
    from napari_segtool.model import SegmentationModel, load_model
    from napari_segtool.training.data import label_values_present

    _check_output(args.output, suffixes=(".json",))
    resolve_device(args.device)
    image = read_image(args.image).data
    labels = _read_labels(args.labels)
    if args.seeds < 1:
        raise InputError("--seeds must be >= 1")
    values = label_values_present(labels)  # sparse ids train as their real class count
    config = SimulationConfig(
        strategy=args.strategy,
        score=args.score,
        initial=args.initial,
        rounds=args.rounds,
        per_round=args.per_round,
        held_out_fraction=args.held_out,
        tile=args.tile,
        finetune=_finetune_config(args),
    )
    runs = []
    for seed in range(args.seeds):
        if args.init:
            model = load_model(args.init)
        else:
            tile = (256, 256) if labels.ndim == 3 else (args.tile, args.tile)
            model = SegmentationModel.new(
                ModelConfig(out_channels=len(values)),
                tile_shape=tile,
                seed=seed,
                label_values=values,
            )
        curve = []
        for point in iter_simulate(image, labels, model, config=config, seed=seed):
            curve.append(point)
            if not args.json:
                print(  # noqa: T201
                    f"seed {seed} round {point.round}: {point.n_revealed} units, "
                    f"held-out Dice {point.dice:.4f} ({point.seconds:.0f} s)"
                )
        runs.append({"seed": seed, "curve": [[p.n_revealed, p.dice] for p in curve],
                     "revealed": list(curve[-1].revealed)})  # fmt: skip
    lengths = {len(r["curve"]) for r in runs}
    mean = []
    if len(lengths) == 1:
        for i in range(lengths.pop()):
            n = runs[0]["curve"][i][0]
            mean.append([n, float(np.mean([r["curve"][i][1] for r in runs]))])
    out = {"strategy": args.strategy, "units": "slices" if labels.ndim == 3 else "tiles",
           "seeds": runs, "mean": mean, "label_values": list(values)}  # fmt: skip
    if args.output is not None:
        _write_json(args.output, _finite(out))
    if args.json:
        print(json.dumps(out))  # noqa: T201
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_segtool.model import list_models, load_model

    rows = []
    for entry in list_models():
        model = load_model(entry.name)
        rows.append({
            "name": entry.name,
            "spatial_dims": model.spatial_dims,
            "in_channels": model.config.in_channels,
            "classes": list(model.class_names),
            "tile_shape": list(model.tile_shape),
            "description": entry.description,
            "file": str(entry.path) if entry.path else None,
            "held_out": {k: v for k, v in model.trained_on.items() if k.startswith("held_out_")},
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))  # noqa: T201
        return 0
    for row in rows:
        figures = ", ".join(
            f"{k.removeprefix('held_out_')} {v}"
            for k, v in row["held_out"].items()
            if not isinstance(v, list)
        )
        line = f"{row['name']:<18} {row['spatial_dims']}D  classes: {', '.join(row['classes'])}"
        print(line)  # noqa: T201
        print(f"{'':<18} {row['description']}")  # noqa: T201
        if figures:
            print(f"{'':<18} held-out: {figures}")  # noqa: T201
    return 0


def _display_missing() -> bool:
    """True on Linux without an X or Wayland display (and no offscreen Qt platform)."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "minimal")):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _cmd_demo(args: argparse.Namespace) -> int:
    if _display_missing():
        raise InputError(
            "no display to open the napari window on (DISPLAY and WAYLAND_DISPLAY are unset); "
            "run it under a virtual display instead: xvfb-run -a napari-segtool demo"
            + (" ..." if len(sys.argv) > 2 else "")
        )
    _check_output(args.screenshot, flag="--screenshot")
    # the demo is a napari window, so it lives with the widgets
    from napari_segtool._widgets.demo import run_demo

    return run_demo(
        args.sample,
        screenshot=args.screenshot,
        segment=args.segment,
        review=args.review,
        finetune=args.finetune,
        project=args.project,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-segtool`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # tifffile logs about every damaged tag: the one-line error suffices
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    commands = {
        "segment": _cmd_segment,
        "evaluate": _cmd_evaluate,
        "train": _cmd_train,
        "simulate": _cmd_simulate,
        "models": _cmd_models,
        "demo": _cmd_demo,
    }
    try:
        return commands[args.command](args)
    except SegtoolError as exc:
        print(f"napari-segtool {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except OSError as exc:  # a path given on the command line: missing, unreadable, disk full
        name = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        print(f"napari-segtool {args.command}: error: {name}{reason}", file=sys.stderr)  # noqa: T201
        return 2
    except MemoryError:
        print(  # noqa: T201
            f"napari-segtool {args.command}: error: out of memory; use a smaller image, crop or "
            "tile it, or a smaller --tile-shape / --batch-size",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
