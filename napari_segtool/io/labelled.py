"""The one definition of "labelled voxels": what the user changed, painted or reviewed.

A voxel counts as labelled (it trains the model, and a re-segmentation leaves it alone) when
the user changed it from what the model wrote, painted it (even back to the same value), or
it lies in a slice marked reviewed. :meth:`~napari_segtool.io.project.ProjectState.labelled`
applies this to a project; training and the widgets read that, never their own version.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = ["labelled_mask"]


def labelled_mask(
    shape: tuple[int, ...],
    *,
    changed: NDArray[np.bool_] | None = None,
    reviewed: Iterable[int] = (),
) -> NDArray[np.bool_]:
    """The voxels whose labels count: those ``changed`` plus every reviewed slice.

    Parameters
    ----------
    shape : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``.
    changed : bool ndarray, optional
        Voxels the user changed or painted (not modified; None: none).
    reviewed : iterable of int
        Slices along Z marked reviewed; for a 2D image the only slice is 0, the whole image.

    Raises
    ------
    InputError
        For a ``changed`` mask of another shape, or a reviewed slice outside the image.

    Examples
    --------
    >>> changed = np.zeros((3, 2, 2), bool); changed[0, 0, 0] = True
    >>> labelled_mask((3, 2, 2), changed=changed, reviewed=[2]).sum(axis=(1, 2)).tolist()
    [1, 0, 4]
    """
    shape = tuple(shape)
    mask = np.zeros(shape, bool) if changed is None else np.array(changed, bool, copy=True)
    if mask.shape != shape:
        raise InputError(f"changed mask {mask.shape} does not match the image {shape}")
    depth = 1 if len(shape) == 2 else shape[0]
    zs = sorted({int(z) for z in reviewed})
    bad = [z for z in zs if not 0 <= z < depth]
    if bad:
        raise InputError(
            f"reviewed slice {bad[0]} is outside 0..{depth - 1} (an image of {depth} "
            "slices); unmark it"
        )
    if zs:
        mask[zs if len(shape) == 3 else ...] = True
    return mask
