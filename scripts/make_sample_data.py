"""Copy the sample images into sample_data/ with their voxel spacing recorded.

python scripts/make_sample_data.py --data ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tifffile

from napari_segtool.io import read_image, write_image

OUT = Path(__file__).resolve().parents[1] / "sample_data"
# ISBI 2012: 4 x 4 nm pixels, 50 nm sections (challenge description)
EM_SPACING = (50.0, 4.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    em = args.data / "isbi2012_em"
    write_image(
        OUT / "isbi2012_em.tif",
        tifffile.imread(em / "train-volume.tif"),
        spacing=EM_SPACING,
        unit="nm",
    )
    write_image(
        OUT / "isbi2012_em_membranes.tif",
        tifffile.imread(em / "train-membranes.tif"),
        spacing=EM_SPACING,
        unit="nm",
    )
    ct = read_image(args.data / "ct_small" / "ct.tif")
    organs = read_image(args.data / "ct_small" / "organs.tif")
    write_image(OUT / "ct_small.tif", ct.data, spacing=ct.spacing, unit=ct.unit or "mm")
    write_image(
        OUT / "ct_small_organs.tif", organs.data, spacing=organs.spacing, unit=organs.unit or "mm"
    )


if __name__ == "__main__":
    main()
