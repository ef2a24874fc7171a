"""The UI's longest stall while the Segment widget segments a large OME-Zarr volume.

Opens the largest volume of ``bench_scale.py`` (1024 x 1024 x 1024 uint8 OME-Zarr, built
there) in a real napari viewer through napari-ome-zarr, picks it in the Segment widget with
its defaults (flip TTA on, precision auto) and clicks Segment. The widget's lazy path fills a
zarr-backed Labels layer in the project folder beside the volume while the worker runs. A
5 ms QTimer heartbeat on the UI thread measures the longest gap between beats, split into
the moment the prediction layer is added (napari creates and draws its first Labels layer)
and the rest of the run (progress reports and the refresh of the displayed slice, which is
put on slice 2 so that its rows become final during the run). The whole volume takes longer
than a benchmark should (about 4 x the CLI's time with TTA), so the run is cancelled after
``--seconds`` and the share done is reported; every later second repeats the same work.

Run under a virtual display, after ``bench_scale.py`` has built the volume::

    xvfb-run -a -s "-screen 0 1600x1100x24" python benchmarks/bench_scale_ui.py \\
        -o benchmarks/results/scale_ui_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", type=Path,
                        default=Path("/tmp/segtool-scale/em_1024x1024.zarr"))  # fmt: skip
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    if not (args.volume / "zarr.json").exists():
        print(f"{args.volume}: not there; run benchmarks/bench_scale.py first", file=sys.stderr)
        return 2

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_segtool.io.project import default_project_dir

    project = default_project_dir(args.volume)
    if project.exists():
        shutil.rmtree(project)
    viewer = napari.Viewer(title="scale ui stall")
    [layer] = viewer.open(str(args.volume), plugin="napari-ome-zarr")
    viewer.dims.set_current_step(0, 2)
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    widget._image.value = layer
    app = QApplication.instance()
    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()

    def pump(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)

    pump(1.5)
    n_before = len(viewer.layers)
    beats.clear()
    t0 = time.perf_counter()
    widget.start()
    shown: list[float] = []
    progress: list[tuple[float, str]] = []
    while time.perf_counter() - t0 < args.seconds and widget.worker is not None:
        app.processEvents()
        if not shown and len(viewer.layers) > n_before:
            shown.append(time.perf_counter())
        progress.append((time.perf_counter() - t0, str(widget._status.value)))
        time.sleep(0.001)
    cancelled_at = time.perf_counter()
    fraction = float(widget._progress.value) / 100
    widget.cancel()
    while widget.worker is not None and time.perf_counter() - cancelled_at < 120:
        app.processEvents()
        time.sleep(0.001)
    stopped = time.perf_counter()
    timer.stop()

    def longest(a: float, b: float) -> float:
        inside = [t for t in beats if a <= t <= b]
        gaps = [y - x for x, y in itertools.pairwise(inside)]
        return round(1000 * max(gaps, default=0.0), 1)

    added = shown[0] if shown else t0
    result = {
        "benchmark": "UI stall while the Segment widget segments a 1 Gvoxel OME-Zarr",
        "command": "python " + " ".join(sys.argv),
        "volume": str(args.volume),
        "shape": list(layer.data.shape),
        "defaults": {"tta": bool(widget._tta.value), "precision": str(widget._precision.value)},
        "seconds_run": round(cancelled_at - t0, 1),
        "fraction_done": fraction,
        "cancel_seconds": round(stopped - cancelled_at, 2),
        "longest_stall_ms": longest(t0, cancelled_at),
        "longest_stall_adding_layer_ms": longest(t0, added + 1.0),
        "longest_stall_after_layer_ms": longest(added + 1.0, cancelled_at),
        "longest_stall_cancelling_ms": longest(cancelled_at, stopped),
        "last_status": progress[-1][1] if progress else "",
        "project_after_cancel_loads": _loads(project),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    viewer.close()
    return 0


def _loads(folder: Path) -> bool:
    from napari_segtool.io.project import Project

    try:
        Project(folder).load()
    except Exception as exc:  # reported, not hidden: the JSON says False and why on stderr
        print(f"project does not load: {exc}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
