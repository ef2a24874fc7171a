"""Plot ``bench_inference.py``'s JSON: seconds per tool, and GFLOP/s as a share of matmul.

    python benchmarks/plot_inference.py [--input benchmarks/results/inference_cpu.json]
                                        [--output docs/inference_speed.png]

One column per case. Top: median seconds of MONAI (the network as given, and under the
reduced-precision autocast when measured) and of each of our variants, with our time as a
share of MONAI's fp32 time on the bars. Bottom: achieved GFLOP/s (job FLOPs / seconds) as a
percentage of the machine's matmul rate in the same precision. A ``--quick`` run's file is
marked as such in the title.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {
    "monai": "0.45",
    "monai_bf16": "0.7",
    "monai_fp16": "0.7",
    "eager": "C0",
    "channels_last": "C1",
    "bf16": "C2",
    "fp16": "C2",
    "auto": "C3",
    "compiled": "C4",
}
ORDER = ["monai", "monai_bf16", "monai_fp16", "eager", "channels_last", "bf16", "fp16",
         "auto", "compiled"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", type=Path, default=ROOT / "benchmarks" / "results" / "inference_cpu.json"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "inference_speed.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(args.input.read_text())
    cases = report["cases"]
    fig, axes = plt.subplots(2, len(cases), figsize=(4.6 * len(cases), 7.5), squeeze=False)
    for col, (name, case) in enumerate(cases.items()):
        tools = [t for t in ORDER if t in case]
        colours = [COLOURS[t] for t in tools]
        seconds = [case[t]["seconds"] for t in tools]
        ax = axes[0][col]
        bars = ax.bar(range(len(tools)), seconds, color=colours)
        for bar, tool in zip(bars, tools, strict=True):
            ratio = case[tool].get("ratio_seconds")
            text = "1.00" if tool == "monai" else f"{ratio:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        shape = " x ".join(map(str, case["shape"]))
        ax.set_title(textwrap.fill(f"{name}: {shape}, {case['model']}", 55), fontsize=8)
        ax.set_ylabel("seconds (median)\nbar label: / MONAI fp32")
        ax.set_xticks(range(len(tools)), tools, rotation=35, ha="right", fontsize=8)

        ax = axes[1][col]
        share = [100 * (case[t].get("matmul_ratio") or 0) for t in tools]
        bars = ax.bar(range(len(tools)), share, color=colours)
        for bar, tool in zip(bars, tools, strict=True):
            label = f"{case[tool]['gflops']:.0f}\n{case[tool]['matmul_precision']}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.axhline(40, color="k", lw=0.8, ls="--")
        ax.set_ylabel("achieved GFLOP/s as % of\nmatmul (same precision)")
        ax.set_xticks(range(len(tools)), tools, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, max(60, *share) * 1.25)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['usable_cores']} cores"
    rates = ", ".join(f"{p} {g:.0f}" for p, g in report["matmul"]["gflops"].items())
    quick = "QUICK SMOKE RUN (small shapes, 1 round) - not a result. " if report["quick"] else ""
    title = (
        f"{quick}Tiled inference on {m['device']} ({where}), torch {m['torch']}, "
        f"MONAI {report['monai']}; matmul GFLOP/s {rates}"
    )
    width = 40 + 35 * len(cases)
    fig.suptitle(
        "\n".join([textwrap.fill(title, width), textwrap.fill(report["command"], width)]),
        fontsize=9,
    )
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
