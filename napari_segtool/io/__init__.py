"""Reading and writing images, labels and other files; atomic saves; memory checks."""

from napari_segtool.io.atomic import atomic_path, atomic_write
from napari_segtool.io.memory import available_memory, check_allocation
from napari_segtool.io.tiff import ImageFile, read_image, write_image

__all__ = [
    "ImageFile",
    "atomic_path",
    "atomic_write",
    "available_memory",
    "check_allocation",
    "read_image",
    "write_image",
]
