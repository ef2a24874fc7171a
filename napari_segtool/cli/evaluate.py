"""``evaluate``: metrics of a label image against a reference, of one pair or a cohort.

One pair is read block by block (:func:`~napari_segtool.metrics.evaluate_blockwise`). Two
folders are a cohort: the files are matched by name (without the image ending, so
``case1.zarr`` is judged against ``case1.nii.gz``), each case is evaluated as one pair, and
the command writes a per-case table (JSON and CSV) and the summary over cases. With
``--scheduler`` the cases (or, for one pair of ``.zarr`` stores, runs of slices) are dask
tasks: the workers open the files themselves, and only counts and metrics come back.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_segtool.cli._common import (
    REGION_HELP,
    TerminalProgress,
    check_grid,
    check_output,
    emit,
    finite,
    parse_region,
    read_labels_file,
    spacing,
    write_json,
)
from napari_segtool.cluster.scheduler import SCHEDULER_HELP
from napari_segtool.errors import InputError, SegtoolError

if TYPE_CHECKING:
    from napari_segtool.io.tiff import ImageFile

#: ``napari_segtool.metrics.DISTANCE_MAX_VOXELS``, written here so that ``--help`` does not
#: import scipy; a test keeps the two equal.
DISTANCE_LIMIT = 512**3
#: Voxels of each volume per task when ``--scheduler`` splits one pair into runs of slices.
TASK_VOXELS = 1 << 26
#: The summary over a cohort: these per-case figures, each as mean, median, std, min, max.
COHORT_KEYS = ("dice", "iou", "precision", "recall", "hd", "hd95", "assd")

EVALUATE_DESCRIPTION = (
    "Compare a label image with a reference. The overlap metrics are accumulated block by "
    "block from confusion counts (a .zarr store is never read whole) and equal the in-memory "
    "numbers exactly. HD, HD95 and ASSD are computed exactly, with both volumes in memory, "
    f"only up to {DISTANCE_LIMIT:,} voxels (DISTANCE_MAX_VOXELS, 512^3); above it, pass "
    "--no-distances, --per-slice (each slice's 2D distances instead of the volume's) or a "
    "--region of at most that size. PRED and REF may be two folders: each prediction is "
    "judged against the reference of the same name (image endings aside), and -o REPORT.json "
    "gets every case and the summary, with the per-case table in REPORT.csv beside it."
)


def add_parsers(sub: Any) -> None:
    """Add ``evaluate`` to the subcommands."""
    ev = sub.add_parser("evaluate", help="compare a label image with a reference",
                        description=EVALUATE_DESCRIPTION)  # fmt: skip
    ev.add_argument("pred", type=Path, help="label image to judge (TIFF, NIfTI, NRRD, MHA, "
                    ".zarr), or a folder of them")  # fmt: skip
    ev.add_argument("ref", type=Path, help="reference label image (TIFF, NIfTI, NRRD, MHA, "
                    ".zarr), or a folder of them with the same names")  # fmt: skip
    ev.add_argument(
        "--spacing",
        type=spacing,
        default=None,
        help="voxel size Z,Y,X (default: from the reference file: TIFF metadata, or the "
        "header of a medical image, in mm)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--no-distances", action="store_true",
                    help="skip HD, HD95 and ASSD (overlap metrics only: any size)")  # fmt: skip
    ev.add_argument("--per-slice", action="store_true",
                    help="add overlap metrics per slice; above the distance limit also each "
                    "slice's 2D HD, HD95 and ASSD (the volume's are then null)")  # fmt: skip
    ev.add_argument("--region", help=f"evaluate only {REGION_HELP}, of both images")
    ev.add_argument(
        "-o",
        "--output",
        type=Path,
        help="also write the metrics to this .json "
        "file (folders: every case and the summary; REPORT.csv beside it)",
    )
    ev.add_argument("--scheduler", help=SCHEDULER_HELP + ". The cases of two folders are "
                    "tasks; one pair of .zarr stores is split into runs of slices")  # fmt: skip
    ev.set_defaults(run=cmd_evaluate)


@dataclass(frozen=True)
class EvalOptions:
    """What ``evaluate`` computes for each pair (sent to the workers with each task)."""

    spacing: tuple[float, ...] | None = None
    distances: bool = True
    per_slice: bool = False
    region: str | None = None
    distance_limit: int = DISTANCE_LIMIT


def _options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(spacing=None if args.spacing is None else tuple(args.spacing),
                       distances=not args.no_distances, per_slice=args.per_slice,
                       region=args.region, distance_limit=DISTANCE_LIMIT)  # fmt: skip


class _Pair:
    """Two opened label files and the boxes of them that are compared (no voxel read)."""

    def __init__(self, pred_path: Path, ref_path: Path, options: EvalOptions) -> None:
        from napari_segtool.io.zarr_io import RegionView

        self.pred = read_labels_file(pred_path, lazy=True)
        try:
            self.ref = read_labels_file(ref_path, lazy=True)
        except BaseException:
            self.pred.close()
            raise
        try:
            check_grid(self.ref, self.pred)  # medical files: the same voxels in space
            self.placed = _reference_box(pred_path, self.pred, self.ref)
            shape = tuple(s.stop - s.start for s in self.placed)
            voxel = options.spacing or self.ref.spacing  # a medical file's spacing is in mm
            ndim = self.ref.data.ndim
            if len(voxel) == 1:
                voxel = tuple(voxel) * ndim
            if len(voxel) != ndim:
                raise InputError(f"--spacing has {len(voxel)} values for a {ndim}D image; "
                                 "give one per axis")  # fmt: skip
            self.spacing = tuple(float(v) for v in voxel)
            self.p, self.r = self.pred.data, self.ref.data
            if tuple(self.r.shape) != shape:
                self.r = RegionView(self.r, self.placed)
            self.region = None
            if options.region is not None:
                self.region = parse_region(options.region, shape)
                self.p, self.r = RegionView(self.p, self.region), RegionView(self.r, self.region)
                shape = tuple(self.p.shape)
            self.shape = shape
            _check_distance_size(pred_path, options, shape)
        except BaseException:
            self.close()
            raise

    @property
    def unit(self) -> str:
        return self.ref.unit

    def close(self) -> None:
        self.pred.close()
        self.ref.close()

    def boxes(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with the reference box and region it was computed on."""
        if tuple(self.pred.data.shape) != tuple(self.ref.data.shape):
            result["reference_box"] = [[s.start, s.stop] for s in self.placed]
        if self.region is not None:
            result["region"] = [[s.start, s.stop] for s in self.region]
        return result


def evaluate_pair(
    pred_path: Path,
    ref_path: Path,
    options: EvalOptions,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The metrics of one prediction against its reference, as ``evaluate PRED REF`` prints
    them, plus ``unit`` (the distances' unit)."""
    from napari_segtool.metrics.blockwise import evaluate_blockwise

    pair = _Pair(Path(pred_path), Path(ref_path), options)
    try:
        result = evaluate_blockwise(
            pair.p, pair.r, spacing=pair.spacing, distances=options.distances,
            per_slice=options.per_slice, max_distance_voxels=options.distance_limit,
            progress=progress,
        )  # fmt: skip
        result = pair.boxes(result)
        result["unit"] = pair.unit
        return result
    finally:
        pair.close()


def count_pair_rows(pred_path: Path, ref_path: Path, options: EvalOptions, rows: tuple[int, int],
                    slice_distances: bool) -> Any:  # fmt: skip
    """A worker's task: the :class:`~napari_segtool.metrics.blockwise.PartialCounts` of the
    slices ``rows`` of one pair (opened here, from shared storage)."""
    from napari_segtool.io.zarr_io import RegionView
    from napari_segtool.metrics.blockwise import count_rows

    pair = _Pair(Path(pred_path), Path(ref_path), options)
    try:
        a, b = rows
        box = (slice(a, b),) + (slice(None),) * (len(pair.shape) - 1)
        return count_rows(RegionView(pair.p, box), RegionView(pair.r, box),
                          per_slice=options.per_slice, slice_distances=slice_distances,
                          spacing=pair.spacing)  # fmt: skip
    finally:
        pair.close()


def evaluate_case(name: str, pred_path: Path, ref_path: Path,
                  options: EvalOptions) -> dict[str, Any]:  # fmt: skip
    """One case of a cohort: its metrics, or its one-line ``error`` (a bad case does not stop
    the others)."""
    row: dict[str, Any] = {"case": name, "pred": str(pred_path), "ref": str(ref_path)}
    try:
        row.update(evaluate_pair(pred_path, ref_path, options))
        row["per_class"] = {str(c): v for c, v in row["per_class"].items()}  # as JSON has it
    except (SegtoolError, OSError, MemoryError) as exc:
        row["error"] = str(exc) or type(exc).__name__
    return row


def _print_metrics(result: dict[str, Any], unit: str) -> None:
    unit = f" {unit}" if unit else ""
    for key, value in result.items():
        if key in ("per_class", "per_slice", "unit"):
            continue
        if key in ("region", "reference_box"):  # boxes of voxels, not figures
            print(f"{key:<20} " + ", ".join(f"{a}:{b}" for a, b in value))  # noqa: T201
            continue
        if value is None:
            print(f"{key:<20} not computed")  # noqa: T201
            continue
        suffix = unit if key in ("hd", "hd95", "assd") else ""
        print(f"{key:<20} {value:.4f}{suffix}")  # noqa: T201
    for c, entry in result["per_class"].items():
        print(f"class {c}: dice {entry['dice']:.4f}  iou {entry['iou']:.4f}")  # noqa: T201


def cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_segtool.cli.batch import is_image_folder

    if is_image_folder(args.pred) or is_image_folder(args.ref):
        return _cmd_cohort(args)
    check_output(args.output, suffixes=(".json",))
    options = _options(args)
    with TerminalProgress("evaluate", quiet=args.json) as bar:
        if args.scheduler is None:
            result = evaluate_pair(args.pred, args.ref, options,
                                   progress=lambda d, t: bar.advance("slice", d, t))  # fmt: skip
        else:
            result = _pair_on_scheduler(args, options, bar)
    unit = result.pop("unit")
    if args.output is not None:
        write_json(args.output, finite(result))
    if args.json:
        emit(result)
    else:
        _print_metrics(result, unit)
    return 0


def _pair_on_scheduler(args: argparse.Namespace, options: EvalOptions,
                       bar: TerminalProgress) -> dict[str, Any]:  # fmt: skip
    """One pair on the cluster: runs of slices as tasks for two ``.zarr`` stores when the
    volume's distances are not needed (they need the whole masks), else one task."""
    from napari_segtool.cluster.scheduler import connect
    from napari_segtool.io.zarr_io import is_zarr_path
    from napari_segtool.metrics.blockwise import combine_counts
    from napari_segtool.metrics.tracker import block_units

    pair = _Pair(args.pred, args.ref, options)
    try:
        shape, unit = pair.shape, pair.unit
        rows = block_units(pair.p, block_voxels=TASK_VOXELS) if len(shape) >= 3 else shape[0]
        whole = options.distances and math.prod(shape) <= options.distance_limit
        boxes = pair.boxes({})
    finally:
        pair.close()
    split = not whole and is_zarr_path(args.pred) and is_zarr_path(args.ref)
    with connect(args.scheduler) as client:
        _announce(client)
        if not split:
            future = client.submit(evaluate_pair, args.pred, args.ref, options, pure=False)
            result = future.result()
            bar.advance("slice", shape[0], shape[0])
            return result
        from distributed import as_completed

        runs = [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]
        slice_distances = options.distances  # above the limit: each slice's own
        futures = [client.submit(count_pair_rows, args.pred, args.ref, options, run,
                                 slice_distances, pure=False) for run in runs]  # fmt: skip
        for done, future in enumerate(as_completed(futures), 1):
            future.result()  # raises the task's error here
            bar.advance("block", done, len(futures))
        parts = [f.result() for f in futures]
    result = combine_counts(parts, per_slice=options.per_slice and len(shape) >= 3)
    result.update(boxes)
    result["unit"] = unit
    return result


def _announce(client: Any) -> None:
    from napari_segtool.cli.batch import dashboard_link

    link = dashboard_link(client)
    where = link or "off (install bokeh)"
    sys.stderr.write(f"scheduler {client.scheduler.address}; dashboard {where}\n")


def match_cases(pred: Path, ref: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """The cases of two folders, matched by name without the image ending: ``(name, pred,
    ref)`` sorted by name, and the names of references without a prediction.

    Raises
    ------
    InputError
        If either is not a folder of images, a prediction has no reference, or two files of a
        folder have the same name once the endings are dropped.
    """
    from napari_segtool.cli.batch import image_stem, is_image_folder

    found = []
    for flag, folder in (("PRED", pred), ("REF", ref)):
        if not is_image_folder(folder):
            raise InputError(f"{folder}: with a folder of cases the other argument ({flag}) "
                             "must be a folder of label images too")  # fmt: skip
        files: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            stem = image_stem(path)
            if stem is None or path.name.startswith("."):
                continue
            if stem in files:
                raise InputError(f"{files[stem]} and {path} are the same case ({stem!r}); "
                                 "keep one")  # fmt: skip
            files[stem] = path
        if not files:
            raise InputError(f"{folder}: no label images (TIFF, NIfTI, NRRD, MHA, .zarr) in it")
        found.append(files)
    preds, refs = found
    orphans = sorted(set(preds) - set(refs))
    if orphans:
        shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3
                                          else "")  # fmt: skip
        raise InputError(f"{ref}: no reference for the prediction(s) {shown}")
    cases = [(name, preds[name], refs[name]) for name in sorted(preds)]
    return cases, sorted(set(refs) - set(preds))


def cohort_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, median, std (population), min and max over the cases of each figure of
    :data:`COHORT_KEYS` and of each class's Dice; cases where a figure is undefined (an
    infinite distance, one mask empty) or that failed are left out of it, and ``n`` says
    how many counted.

    Examples
    --------
    >>> s = cohort_summary([{"dice": 0.5, "per_class": {}}, {"dice": 1.0, "per_class": {}}])
    >>> s["dice"]["mean"], s["dice"]["n"], s["cases"]
    (0.75, 2, 2)
    """

    def stats(values: list[float]) -> dict[str, Any]:
        v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
        if v.size == 0:
            return {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0}
        return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
                "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}  # fmt: skip

    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {"cases": len(rows), "failed": len(rows) - len(ok)}
    for key in COHORT_KEYS:
        summary[key] = stats([r.get(key) for r in ok])
    classes = sorted({str(c) for r in ok for c in r["per_class"]}, key=_class_order)
    summary["per_class_dice"] = {c: stats([r["per_class"][c]["dice"] for r in ok
                                           if c in r["per_class"]]) for c in classes}  # fmt: skip
    return summary


def _class_order(c: str) -> tuple[int, str]:
    return (int(c), "") if c.lstrip("-").isdigit() else (0, c)


def cohort_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The per-case table: one row per case, its figures and each class's Dice."""
    classes = sorted({str(c) for r in rows for c in r.get("per_class", {})}, key=_class_order)
    columns = ["case", *COHORT_KEYS, *(f"dice_class_{c}" for c in classes), "error", "pred",
               "ref"]  # fmt: skip
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        line = []
        for col in columns:
            if col.startswith("dice_class_"):
                entry = r.get("per_class", {}).get(col[len("dice_class_") :])
                value = None if entry is None else entry["dice"]
            else:
                value = r.get(col)
            if isinstance(value, float):
                value = "" if not np.isfinite(value) else repr(value)
            line.append("" if value is None else value)
        writer.writerow(line)
    return out.getvalue()


def _cmd_cohort(args: argparse.Namespace) -> int:
    from napari_segtool.io import atomic_write

    check_output(args.output, suffixes=(".json",))
    table = None if args.output is None else args.output.with_suffix(".csv")
    check_output(table, flag="-o (its .csv table)", suffixes=(".csv",))
    cases, missing = match_cases(args.pred, args.ref)
    options = _options(args)
    with TerminalProgress("evaluate", quiet=args.json) as bar:
        if args.scheduler is None:
            rows = []
            for name, p, r in cases:
                rows.append(evaluate_case(name, p, r, options))
                bar.advance("case", len(rows), len(cases))
        else:
            rows = _cases_on_scheduler(args.scheduler, cases, options, bar)
    units = {r.pop("unit") for r in rows if "unit" in r}
    summary = cohort_summary(rows)
    summary["unit"] = units.pop() if len(units) == 1 else None
    summary["missing_predictions"] = missing
    report = {"summary": summary, "cases": rows}
    if args.output is not None:
        write_json(args.output, finite(report))
        data = cohort_csv(rows).encode()
        atomic_write(table, lambda fh: fh.write(data))
    if args.json:
        emit(report)
    else:
        _print_cohort(rows, summary)
    for name in missing:
        sys.stderr.write(f"napari-segtool evaluate: warning: reference {name} has no "
                         "prediction\n")  # fmt: skip
    for r in rows:
        if "error" in r:
            sys.stderr.write(f"napari-segtool evaluate: error: {r['case']}: {r['error']}\n")
    return 2 if summary["failed"] else 0


def _cases_on_scheduler(
    scheduler: str,
    cases: list[tuple[str, Path, Path]],
    options: EvalOptions,
    bar: TerminalProgress,
) -> list[dict[str, Any]]:
    from distributed import as_completed

    from napari_segtool.cluster.scheduler import connect

    with connect(scheduler) as client:
        _announce(client)
        futures = [client.submit(evaluate_case, name, p, r, options, pure=False)
                   for name, p, r in cases]  # fmt: skip
        for done, future in enumerate(as_completed(futures), 1):
            future.result()
            bar.advance("case", done, len(futures))
        return [f.result() for f in futures]


def _print_cohort(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    width = max(12, *(len(r["case"]) for r in rows))
    print(f"{'case':<{width}} {'dice':>8} {'iou':>8} {'hd95':>10}")  # noqa: T201
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<{width}} failed: {r['error']}")  # noqa: T201
            continue
        hd95 = r.get("hd95")
        shown = "-" if hd95 is None or not np.isfinite(hd95) else f"{hd95:.3f}"
        print(f"{r['case']:<{width}} {r['dice']:>8.4f} {r['iou']:>8.4f} {shown:>10}")  # noqa: T201
    for key in COHORT_KEYS:
        s = summary[key]
        if s["n"]:
            print(f"{key:<8} mean {s['mean']:.4f}  median {s['median']:.4f}  "  # noqa: T201
                  f"std {s['std']:.4f}  (n={s['n']})")  # fmt: skip


#####
def _reference_box(pred_path: Path, pred: ImageFile, ref: ImageFile) -> tuple[slice, ...]:
    """The box of the reference the prediction is judged on: all of it, or where a
    ``segment --region`` output lies (:func:`_placed_box`); refused otherwise."""
    from napari_segtool.io.zarr_io import is_zarr_path

    shape = tuple(int(n) for n in ref.data.shape)
    if tuple(pred.data.shape) == shape:
        return tuple(slice(0, n) for n in shape)
    placed = _placed_box(pred, ref, zarr=is_zarr_path(pred_path))
    if placed is None:
        raise InputError(
            f"prediction {tuple(pred.data.shape)} and reference {shape} differ in shape (a "
            "`segment --region` output in .zarr is matched to its box of the reference by "
            "its translation; this one has none that fits)"
        )
    return placed


def _placed_box(pred: ImageFile, ref: ImageFile, *, zarr: bool) -> tuple[slice, ...] | None:
    """The box of ``ref`` that ``pred`` covers, from their origins, or None.

    A ``segment --region`` output written as ``.zarr`` carries the box's offset as its
    translation (``origin``; none is a zero translation, as OME-Zarr has it); with the same
    spacing, a whole number of voxels from the reference's origin and inside it, the
    prediction is compared with that box. Other formats are never placed: a TIFF cannot
    record an offset.
    """
    p_shape, r_shape = tuple(pred.data.shape), tuple(ref.data.shape)
    if not zarr or len(p_shape) != len(r_shape):
        return None
    n = len(r_shape)
    p_origin = pred.origin if pred.origin is not None else (0.0,) * n
    spacing = tuple(float(v) for v in (ref.spacing or (1.0,) * n))
    if len(spacing) != n or tuple(float(v) for v in (pred.spacing or (1.0,) * n)) != spacing:
        return None
    r_origin = ref.origin if ref.origin is not None else (0.0,) * n
    box = []
    for size, full, po, ro, sp in zip(p_shape, r_shape, p_origin, r_origin, spacing,
                                      strict=True):  # fmt: skip
        start = (float(po) - float(ro)) / sp
        if abs(start - round(start)) > 1e-6 or round(start) < 0 or round(start) + size > full:
            return None
        box.append(slice(round(start), round(start) + size))
    return tuple(box)


def _check_distance_size(pred_path: Path, options: EvalOptions, shape: tuple[int, ...]) -> None:
    """Refuse distances of a volume above :data:`DISTANCE_LIMIT` before anything is read."""
    voxels = math.prod(shape)
    limit = options.distance_limit
    if not options.distances or voxels <= limit:
        return
    if options.per_slice and len(shape) == 3 and math.prod(shape[1:]) <= limit:
        return  # each slice's distances instead
    raise InputError(
        f"{pred_path}: HD, HD95 and ASSD are computed exactly only up to {limit:,} "
        f"voxels and these labels have {voxels:,}; pass --no-distances (the overlap metrics, "
        "block by block), --per-slice (each slice's distances) or --region z0:z1,y0:y1,x0:x1 "
        "(a box of at most that many voxels)"
    )


#####
