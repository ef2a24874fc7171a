"""``models`` (the bundled models), ``export`` / ``import`` (bioimage.io model packages) and
``demo`` (napari with the plugin and a sample)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from napari_segtool.cli._common import check_output, emit
from napari_segtool.errors import InputError


def add_parsers(sub: Any) -> None:
    """Add ``models`` and ``demo`` to the subcommands."""
    models = sub.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=cmd_models)

    export = sub.add_parser(
        "export",
        help="write a model as a bioimage.io model package (.zip), checked by bioimage.io",
        description="Write MODEL (a bundled name or a model file) as a bioimage.io model "
        "package (spec 0.5), test it with bioimageio.core and move it into place only if it "
        "passes. Needs the bioimageio extra: pip install 'napari-segtool[bioimageio]'.",
    )
    export.add_argument("model", help="bundled model name or model file (.pt)")
    export.add_argument("-o", "--output", type=Path, required=True, help="package to write (.zip)")
    export.add_argument(
        "--test-image", type=Path,
        help="image to crop the test input from (default: the bundled EM sample for 2D "
        "models, the CT sample for 3D ones)",
    )  # fmt: skip
    export.add_argument(
        "--slice", type=int, dest="slice_index",
        help="slice of a stack for a 2D model's test input (default: the middle of the "
        "model's held-out slices, else of the stack)",
    )  # fmt: skip
    export.add_argument(
        "--author", action="append", dest="authors",
        help="an author of the model (repeat for several; default: napari-segtool developers)",
    )  # fmt: skip
    export.add_argument("--license", default="BSD-3-Clause", help="SPDX licence of the weights")
    export.add_argument(
        "--no-check", action="store_true", help="skip bioimage.io's model test (not advised)"
    )
    export.set_defaults(run=cmd_export)

    imp = sub.add_parser(
        "import",
        help="convert a bioimage.io package napari-segtool exported into a model file",
        description="Read a bioimage.io package whose architecture is one napari-segtool "
        "registers, from its weights alone (no code from the package runs), and save it as a "
        "model file. Other packages are refused with the reason.",
    )
    imp.add_argument("package", type=Path, help="bioimage.io package (.zip)")
    imp.add_argument(
        "-o", "--output", type=Path, help="model file to write (default: PACKAGE with .pt)"
    )
    imp.add_argument("--force", action="store_true", help="replace an existing model file")
    imp.set_defaults(run=cmd_import)

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
    demo.add_argument(
        "--queue",
        action="store_true",
        help="segment with flip TTA and dock the Queue on patches (after the round with "
        "--finetune, marking the top patch reviewed)",
    )
    demo.add_argument("--project", type=Path, help="with --finetune: the project folder")
    demo.set_defaults(run=cmd_demo)


def _model_row(entry: Any) -> dict[str, Any]:
    from napari_segtool.model import load_model

    model = load_model(entry.name)
    return {
        "name": entry.name,
        "architecture": model.config.architecture,
        "spatial_dims": model.spatial_dims,
        "in_channels": model.config.in_channels,
        "classes": list(model.class_names),
        "tile_shape": list(model.tile_shape),
        "description": entry.description,
        "file": str(entry.path) if entry.path else None,
        "held_out": {k: v for k, v in model.trained_on.items() if k.startswith("held_out_")},
    }


def cmd_models(args: argparse.Namespace) -> int:
    from napari_segtool.model import list_models

    rows = [_model_row(entry) for entry in list_models()]
    if args.json:
        emit(rows, indent=2)
        return 0
    for row in rows:
        figures = ", ".join(
            f"{k.removeprefix('held_out_')} {v}"
            for k, v in row["held_out"].items()
            if not isinstance(v, list)
        )
        line = (f"{row['name']:<18} {row['spatial_dims']}D {row['architecture']}  classes: "
                f"{', '.join(row['classes'])}")  # fmt: skip
        print(line)  # noqa: T201
        print(f"{'':<18} {row['description']}")  # noqa: T201
        if figures:
            print(f"{'':<18} held-out: {figures}")  # noqa: T201
    return 0


def _quiet_bioimageio(verbose: bool) -> None:
    """bioimage.io's libraries log every check through loguru; keep them to -v."""
    if verbose:
        return
    try:
        from loguru import logger
    except ImportError:  # the bioimageio extra is missing: export says so itself
        return
    logger.disable("bioimageio")


def cmd_export(args: argparse.Namespace) -> int:
    from napari_segtool.model import load_model
    from napari_segtool.workflows.sharing import export_bioimageio

    check_output(args.output, flag="-o", suffixes=(".zip",))
    if args.test_image is not None and not args.test_image.is_file():
        raise InputError(f"--test-image {args.test_image}: no such file")
    model = load_model(args.model)
    image, channel_axis = None, None
    if args.test_image is not None:
        from napari_segtool.io import read_image

        read = read_image(args.test_image)
        image = read.data
        channel_axis = -1 if read.rgb else read.channel_axis
    _quiet_bioimageio(args.verbose)
    done = export_bioimageio(
        model,
        args.output,
        test_image=image,
        channel_axis=channel_axis,
        slice_index=args.slice_index,
        authors=tuple(args.authors or ("napari-segtool developers",)),
        license=args.license,
        check=not args.no_check,
    )
    check = done.check
    emit({
        "package": str(done.path),
        "model": model.name,
        "architecture": model.config.architecture,
        "test_input_shape": list(done.test_shape),
        "bioimageio": None if check is None else check.status,
        "checks": None if check is None else len(check.checks),
        "warnings": [] if check is None else list(check.warnings),
        "seconds": round(done.seconds, 1),
    })  # fmt: skip
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from napari_segtool.model.bioimageio_package import read_package

    if args.package.suffix.lower() != ".zip":
        raise InputError(f"{args.package}: a bioimage.io package ends in .zip")
    out = args.output if args.output is not None else args.package.with_suffix(".pt")
    check_output(out, flag="-o", suffixes=(".pt",))
    if out.exists() and not args.force:
        raise InputError(f"-o {out}: the file exists; pass --force to replace it")
    model = read_package(args.package)
    model.save(out)
    emit({
        "model": str(out),
        "name": model.name,
        "architecture": model.config.architecture,
        "spatial_dims": model.spatial_dims,
        "classes": list(model.class_names),
    })  # fmt: skip
    return 0


def display_missing() -> bool:
    """True on Linux without an X or Wayland display (and no offscreen Qt platform)."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "minimal")):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args: argparse.Namespace) -> int:
    if display_missing():
        raise InputError(
            "no display to open the napari window on (DISPLAY and WAYLAND_DISPLAY are unset); "
            "run it under a virtual display instead: xvfb-run -a napari-segtool demo"
            + (" ..." if len(sys.argv) > 2 else "")
        )
    check_output(args.screenshot, flag="--screenshot")
    # the demo is a napari window, so it lives with the widgets
    from napari_segtool._widgets.demo import run_demo

    return run_demo(args.sample, screenshot=args.screenshot, segment=args.segment,
                    review=args.review, finetune=args.finetune, queue=args.queue,
                    project=args.project)  # fmt: skip
