"""``models`` (the bundled models) and ``demo`` (napari with the plugin and a sample)."""

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
                    review=args.review, finetune=args.finetune, project=args.project)  # fmt: skip
