"""The one definition of "labelled voxels": what the user changed, painted or reviewed.

A voxel counts as labelled (it trains the model, and a re-segmentation leaves it alone) when
the user changed it from what the model wrote, painted it (even back to the same value), or
it lies in a slice marked reviewed. :meth:`~napari_segtool.io.project.ProjectState.labelled`
applies this to a project; training and the widgets read that, never their own version.
:func:`labelled_in_box` is the same definition over one box of the image, for projects whose
volume is read block by block (:mod:`napari_segtool.io.chunked_state`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = ["labelled_in_box", "labelled_mask", "reviewed_problem"]


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
    zs = sorted({int(z) for z in reviewed})
    problem = reviewed_problem(zs, shape)
    if problem:
        raise InputError(problem)
    if zs:
        mask[zs if len(shape) == 3 else ...] = True
    return mask


def reviewed_problem(reviewed: Iterable[int], shape: tuple[int, ...]) -> str | None:
    """What is wrong with reviewed slices for an image of ``shape`` (None: nothing).

    >>> reviewed_problem([0, 5], (3, 8, 8))
    'reviewed slice 5 is outside 0..2 (an image of 3 slices); unmark it'
    """
    depth = 1 if len(shape) == 2 else shape[0]
    bad = sorted(int(z) for z in reviewed if not 0 <= int(z) < depth)
    if bad:
        return (
            f"reviewed slice {bad[0]} is outside 0..{depth - 1} (an image of {depth} "
            "slices); unmark it"
        )
    return None


def labelled_in_box(
    shape: tuple[int, ...],
    box: tuple[slice, ...],
    *,
    changed: NDArray[np.bool_] | None = None,
    reviewed: Iterable[int] = (),
) -> NDArray[np.bool_]:
    """:func:`labelled_mask` over one box of an image of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        The whole image's shape, ``(Y, X)`` or ``(Z, Y, X)``.
    box : tuple of slice
        One ``slice(start, stop)`` per axis, inside the image (steps of 1).
    changed : bool ndarray of the box's shape, optional
        Voxels of the box the user changed or painted (not modified).
    reviewed : iterable of int
        Reviewed slices of the whole image (Z indices; 0 for a 2D image, which is all of it).

    Returns
    -------
    bool ndarray
        Of the box's shape.

    Raises
    ------
    InputError
        For a box outside the image, a ``changed`` mask of another shape, or a reviewed
        slice outside the image.

    Examples
    --------
    >>> m = labelled_in_box((4, 2, 2), (slice(2, 4), slice(0, 2), slice(0, 1)), reviewed=[3])
    >>> m[:, :, 0].tolist()
    [[False, False], [True, True]]
    """
    shape = tuple(shape)
    bounds = _bounds(box, shape)
    zs = {int(z) for z in reviewed}
    problem = reviewed_problem(zs, shape)
    if problem:
        raise InputError(problem)
    box_shape = tuple(b - a for a, b in bounds)
    if len(shape) == 3:
        z0, z1 = bounds[0]
        local = [z - z0 for z in zs if z0 <= z < z1]
    else:
        local = sorted(zs)
    return labelled_mask(box_shape, changed=changed, reviewed=local)


def _bounds(box: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, stop)`` per axis of a box inside ``shape``; InputError for anything else."""
    try:
        if len(box) != len(shape) or any(s.step not in (None, 1) for s in box):
            raise TypeError
        bounds = [(operator.index(s.start), operator.index(s.stop)) for s in box]
    except (TypeError, AttributeError):
        raise InputError(f"box {box} is not one slice(start, stop) per axis") from None
    if not all(0 <= a < b <= n for (a, b), n in zip(bounds, shape, strict=True)):
        raise InputError(f"box {box} is not inside the image {shape}")
    return bounds
