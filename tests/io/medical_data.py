"""Medical test volumes made with SimpleITK itself: oblique directions, anisotropic voxels.

Everything here is in ITK's own ``(x, y, z)`` order (what SimpleITK's setters take), so the
tests compare the package's ``(Z, Y, X)`` geometry with the library's, not with itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813


def rotation(theta: float = 0.3) -> np.ndarray:
    """A proper rotation (det +1) about an oblique axis, with the y and z axes swapped and one
    of them flipped: no entry of it is 0 or 1 by chance, and every axis moves."""
    c, s = np.cos(theta), np.sin(theta)
    about_z = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    about_x = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    swap = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    return about_z @ about_x @ swap


DIRECTIONS = {
    "rotation": rotation(),
    "reflection": rotation() @ np.diag([1.0, 1.0, -1.0]),  # det -1: a left-handed grid
}
SPACING = (0.7, 0.55, 2.5)  # x, y, z (mm)
ORIGIN = (-120.5, 33.25, 80.0)  # x, y, z (mm)


def volume(shape: tuple[int, ...] = (6, 20, 24), seed: int = 0) -> np.ndarray:
    """A ``(Z, Y, X)`` int16 CT-like array with negative values (air) and a marked maximum."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1500, shape).astype(np.int16)
    mark = (4, 13, 6)[-len(shape) :]  # the marked voxel, (z, y, x), where it fits
    data[tuple(min(i, n - 1) for i, n in zip(mark, shape, strict=True))] = 3000
    return data


def image(
    data: np.ndarray,
    direction: np.ndarray | None = None,
    spacing: tuple[float, ...] = SPACING,
    origin: tuple[float, ...] = ORIGIN,
) -> sitk.Image:
    """A SimpleITK image of a ``(Z, Y, X)`` array with the given ``(x, y, z)`` geometry."""
    n = data.ndim
    img = sitk.GetImageFromArray(data)
    img.SetSpacing(spacing[:n])
    img.SetOrigin(origin[:n])
    if direction is None:
        direction = DIRECTIONS["rotation"] if n == 3 else PLANE
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


PLANE = np.array([[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]])  # 2D rotation


def physical(img: sitk.Image, index_zyx) -> np.ndarray:
    """The library's physical point (x, y, z) of the voxel at a ``(Z, Y, X)`` index."""
    return np.array(img.TransformIndexToPhysicalPoint([int(i) for i in reversed(index_zyx)]))


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    uid: str = "1.2.826.0.1.3680043.2.1125.1.7001",
    direction: np.ndarray | None = None,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = ORIGIN,
    intercept: int = -1024,
    names: list[str] | None = None,
) -> list[Path]:
    """Write a ``(Z, Y, X)`` array of Hounsfield units as one CT series, a file per slice.

    Each slice gets ImagePositionPatient (its own position), ImageOrientationPatient,
    RescaleSlope 1 and RescaleIntercept ``intercept`` (GDCM stores ``hu - intercept``), the
    SeriesInstanceUID and its own SOPInstanceUID. File ``k`` is named ``names[k]``, so
    shuffled names check that reading sorts by position, not by name.
    """
    d = DIRECTIONS["rotation"] if direction is None else direction
    vol = image(hu, d, spacing, origin)
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"slice{k:03d}.dcm" for k in range(hu.shape[0])]
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # also for names without .dcm
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(hu.shape[0]):
        s = vol[:, :, k]
        position = "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": iop,
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": str(intercept),
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        path = folder / names[k]
        writer.SetFileName(str(path))
        writer.Execute(s)
        paths.append(path)
    return paths
