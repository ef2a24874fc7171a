"""Reading and writing images, labels and other files; atomic saves."""

from napari_segtool.io.atomic import atomic_path, atomic_write
from napari_segtool.io.tiff import read_image, write_image

__all__ = ["atomic_path", "atomic_write", "read_image", "write_image"]
