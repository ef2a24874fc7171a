"""The UI's longest stall while the Segment widget runs (flip TTA) in a real napari viewer.

A 5 ms QTimer heartbeat runs on the UI thread; the longest gap between two beats, from the
click until the prediction and uncertainty layers are shown, is the longest time the window
could not react. It is also split at the moment the worker hands its result to the UI
thread: while segmenting (the worker computes) and while the result is shown (napari creates
or updates the layers and draws them). Two runs: the first adds the layers, the second updates
them in place.
Run under a virtual display::

    xvfb-run -a -s "-screen 0 1600x1100x24" python benchmarks/bench_ui_stall.py \\
        -o benchmarks/results/ui_stall_cpu.json

Data: ISBI 2012 EM slices 10-19 (10 x 512 x 512), the bundled em-membranes-2d model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()

    import napari
    import tifffile
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    data_dir = Path(__file__).resolve().parents[1] / "sample_data"
    image = tifffile.imread(data_dir / "isbi2012_em.tif")[10 : 10 + args.slices]
    viewer = napari.Viewer(title="ui stall")
    viewer.add_image(image, name="em")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    app = QApplication.instance()
    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    end = time.perf_counter() + 1.5
    while time.perf_counter() < end:
        app.processEvents()
    assert widget._tta.value, "flip TTA should be on by default"
    runs = []
    shown: list[float] = []
    original = widget._on_returned

    def on_returned(result: object) -> None:  # the moment the worker hands its result over
        shown.append(time.perf_counter())
        original(result)

    widget._on_returned = on_returned  # the worker connects to it when the run starts
    for run in ("first (adds the layers)", "second (updates them)"):
        beats.clear()
        shown.clear()
        t0 = time.perf_counter()
        worker = widget.start()
        assert worker is not None
        while widget.worker is not None:
            app.processEvents()
            time.sleep(0.001)
        seconds = time.perf_counter() - t0
        end = time.perf_counter() + 1.0  # layers drawn after the worker returns
        while time.perf_counter() < end:
            app.processEvents()
        pairs = list(itertools.pairwise(beats))
        gaps = sorted(1000 * (b - a) for a, b in pairs)
        computing = [1000 * (b - a) for a, b in pairs if b <= shown[0]]
        showing = [1000 * (b - a) for a, b in pairs if b > shown[0]]
        runs.append({
            "run": run,
            "seconds": round(seconds, 2),
            "longest_stall_ms": round(gaps[-1], 1),
            "p99_gap_ms": round(gaps[int(0.99 * (len(gaps) - 1))], 1),
            "longest_stall_while_segmenting_ms": round(max(computing), 1),
            "longest_stall_showing_result_ms": round(max(showing), 1),
            "beats": len(beats),
        })  # fmt: skip
    timer.stop()
    layers = [layer.name for layer in viewer.layers]
    viewer.close()
    report = {
        "benchmark": "longest UI stall while Segment (flip TTA) runs",
        "image": f"ISBI 2012 EM {args.slices} x 512 x 512",
        "runs": runs,
        "layers": layers,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
