"""Paint latency as the user feels it: a brush dab (mouse press and release on the canvas)
until the canvas has redrawn, in a real napari viewer, with and without the plugin's docks.

Also times Z-slider steps (a step until the redraw) with the same docks open. Run under a
virtual display, one configuration per fresh process (so one configuration's leftovers do
not slow the next), alternating the configurations over several rounds::

    xvfb-run -a -s "-screen 0 2400x1800x24" python benchmarks/bench_paint_latency.py \\
        --rounds 5 -o benchmarks/results/paint_latency_cpu.json

Data: the ISBI 2012 EM stack (30 x 512 x 512) as "3D" and its slice 15 as "2D"; the
"prediction" being painted is the reference with 3 % of voxels flipped (a stand-in with the
same size and label count as a real prediction, so no network runs during the benchmark).
Brush size 20, label 1, 25 dabs at distinct places on the displayed slice; the window is
sized so the canvas is 800 x 1400 pixels in every configuration (Review docked on the right,
Fine-tune on the left), since drawing with software OpenGL costs per pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("napari", "review", "review+finetune")
CANVAS = (800, 1400)  # canvas pixels, the same in every configuration (Fine-tune is tall)
SHAPES = ("2d", "3d")


def _measure(config: str, shape: str, dabs: int, steps: int) -> dict:
    import napari
    import numpy as np
    import tifffile
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from napari_segtool._widgets.segment import ORIGINAL_KEY
    from napari_segtool.layer_roles import PREDICTION, REFERENCE, ROLE_KEY

    data_dir = Path(__file__).resolve().parents[1] / "sample_data"
    image = tifffile.imread(data_dir / "isbi2012_em.tif")
    ref = tifffile.imread(data_dir / "isbi2012_em_membranes.tif")
    if shape == "2d":
        image, ref = image[15], ref[15]
    rng = np.random.default_rng(0)
    pred = ref.copy()
    flip = rng.random(pred.shape) < 0.03
    pred[flip] = 1 - pred[flip]
    original = pred.copy()
    original.setflags(write=False)

    viewer = napari.Viewer(title="paint latency")
    viewer.window.resize(1500, 1000)  # then sized so that the canvas is CANVAS
    viewer.add_image(image, name="em")
    viewer.add_labels(ref, name="em reference", metadata={ROLE_KEY: REFERENCE}, opacity=0.4)
    layer = viewer.add_labels(
        pred, name="em prediction", metadata={ROLE_KEY: PREDICTION, ORIGINAL_KEY: original}
    )
    folder = None
    if "review" in config:
        viewer.window.add_plugin_dock_widget("napari-segtool", "Review")
    if "finetune" in config:
        import tempfile

        dock, ft = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
        # its own side of the window: two docks stacked on one side would not fit the
        # screen's height and would make the window, and so the canvas, larger
        viewer.window._qt_window.addDockWidget(Qt.LeftDockWidgetArea, dock)
        folder = Path(tempfile.mkdtemp()) / "bench.segtool"
        ft._folder.value = folder
        assert ft.open_project()
    if shape == "3d":
        viewer.dims.set_current_step(0, 15)
    viewer.layers.selection.active = layer
    layer.mode = "paint"
    layer.brush_size = 20
    layer.selected_label = 1
    app = QApplication.instance()
    canvas = viewer.window._qt_viewer.canvas
    scene = canvas._scene_canvas
    native = scene.native
    paints = [0]
    layer.events.paint.connect(lambda _e: paints.__setitem__(0, paints[0] + 1))
    draws = [0]
    scene.events.draw.connect(lambda _e: draws.__setitem__(0, draws[0] + 1), position="last")

    def settle(seconds: float = 1.0) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    def until_drawn(before: int, timeout: float = 5.0) -> None:
        end = time.perf_counter() + timeout
        while draws[0] == before and time.perf_counter() < end:
            app.processEvents()

    viewer.window._qt_window.show()
    settle(1.0)
    for _ in range(3):  # the same canvas size in every configuration: rendering cost is per pixel
        window = viewer.window._qt_window
        window.resize(window.width() + CANVAS[0] - native.width(),
                      window.height() + CANVAS[1] - native.height())  # fmt: skip
        settle(0.5)
    settle(1.0)
    w, h = native.width(), native.height()
    paint_ms = []
    for i in range(dabs):
        x = int(w * (0.3 + 0.4 * (i % 5) / 4))
        y = int(h * (0.3 + 0.4 * (i // 5 % 5) / 4))
        QTest.mouseMove(native, QPoint(x, y))  # the cursor arrives first, as a hand's would
        settle(0.25)  # the user's hand moves between dabs; timers (the plot) fire here
        before = draws[0]
        t0 = time.perf_counter()
        QTest.mousePress(native, Qt.LeftButton, Qt.NoModifier, QPoint(x, y))
        QTest.mouseRelease(native, Qt.LeftButton, Qt.NoModifier, QPoint(x, y))
        until_drawn(before)
        paint_ms.append(1000 * (time.perf_counter() - t0))
    step_ms = []
    if shape == "3d":
        for i in range(steps):
            settle(0.2)
            before = draws[0]
            t0 = time.perf_counter()
            viewer.dims.set_current_step(0, 10 + i % 10)
            until_drawn(before)
            step_ms.append(1000 * (time.perf_counter() - t0))
    painted = int((np.asarray(layer.data) != original).sum())
    viewer.close()
    return {
        "config": config,
        "shape": shape,
        "paint_ms": [round(v, 2) for v in paint_ms],
        "step_ms": [round(v, 2) for v in step_ms],
        "voxels_painted": painted,
        "paint_events": paints[0],
        "canvas": [w, h],
    }


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per config")
    parser.add_argument("--dabs", type=int, default=25)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(args.one[0], args.one[1], args.dabs, args.steps)))
        return 0
    if not os.environ.get("DISPLAY"):
        parser.error("needs a display: run under xvfb-run -a")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for shape in SHAPES:
            for config in CONFIGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", config, shape, "--dabs", str(args.dabs),
                     "--steps", str(args.steps)],
                    capture_output=True, text=True, check=True, timeout=600,
                )  # fmt: skip
                result = json.loads(out.stdout.splitlines()[-1])
                runs.setdefault((config, shape), []).append(result)
    results = []
    for (config, shape), items in runs.items():
        paint = [v for r in items for v in r["paint_ms"]]
        step = [v for r in items for v in r["step_ms"]]
        results.append({"config": config, "shape": shape, "paint_ms": _summary(paint),
                        "step_ms": _summary(step),
                        "voxels_painted": [r["voxels_painted"] for r in items],
                        "canvas": items[0]["canvas"]})  # fmt: skip
    for r in results:
        # paired by round: each round ran every configuration back to back, so the ratio of
        # a round's medians cancels the machine's slow drift; the median over rounds is kept
        own = runs[(r["config"], r["shape"])]
        base = runs[("napari", r["shape"])]
        for key in ("paint_ms", "step_ms"):
            ratios = [
                statistics.median(a[key]) / statistics.median(b[key])
                for a, b in zip(own, base, strict=True)
                if a[key] and b[key]
            ]
            if ratios:
                name = key.replace("_ms", "_overhead")
                r[name] = round(statistics.median(ratios) - 1, 3)
                r[name + "_per_round"] = [round(x - 1, 3) for x in ratios]
    report = {
        "benchmark": "paint latency (dab to redrawn canvas) and Z-slider steps",
        "display": "Xvfb, Mesa llvmpipe (software OpenGL)",
        "rounds": args.rounds,
        "dabs_per_round": args.dabs,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
