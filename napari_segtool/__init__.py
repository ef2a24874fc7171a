"""napari-segtool: human-in-the-loop U-Net segmentation of 2D images and 3D stacks.

Importing the package is cheap: it loads neither torch nor Qt nor napari. The compute lives in
``napari_segtool.model``, ``napari_segtool.inference`` and ``napari_segtool.io``; the napari
widgets in ``napari_segtool._widgets``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-segtool")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
