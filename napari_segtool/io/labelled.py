"""The one definition of "labelled voxels": what the user changed, painted or reviewed.

A voxel counts as labelled (it trains the model, and a re-segmentation leaves it alone) when
the user changed it from what the model wrote, painted it (even back to the same value), or
it lies in a slice or a patch marked reviewed. A reviewed patch is a box within one slice,
recorded as ``(z, y0, y1, x0, x1)`` (``z`` is 0 for a 2D image): a unit the Queue proposed
and the user checked. :meth:`~napari_segtool.io.project.ProjectState.labelled`
applies this to a project; training and the widgets read that, never their own version.
:func:`labelled_in_box` is the same definition over one box of the image, for projects whose
volume is read block by block (:mod:`napari_segtool.io.chunked_state`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = [
    "Patch",
    "as_patches",
    "labelled_in_box",
    "labelled_mask",
    "patch_problem",
    "reviewed_problem",
]

Patch = tuple[int, int, int, int, int]
"""A reviewed patch: ``(z, y0, y1, x0, x1)``, the box ``[z, y0:y1, x0:x1]`` (z 0 in 2D)."""


def labelled_mask(
    shape: tuple[int, ...],
    *,
    changed: NDArray[np.bool_] | None = None,
    reviewed: Iterable[int] = (),
    patches: Iterable[Sequence[int]] = (),
) -> NDArray[np.bool_]:
    """The voxels whose labels count: those ``changed`` plus every reviewed slice and patch.

    Parameters
    ----------
    shape : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``.
    changed : bool ndarray, optional
        Voxels the user changed or painted (not modified; None: none).
    reviewed : iterable of int
        Slices along Z marked reviewed; for a 2D image the only slice is 0, the whole image.
    patches : iterable of (z, y0, y1, x0, x1)
        Patches marked reviewed (:data:`Patch`).

    Raises
    ------
    InputError
        For a ``changed`` mask of another shape, or a reviewed slice or patch outside the
        image.

    Examples
    --------
    >>> changed = np.zeros((3, 2, 2), bool); changed[0, 0, 0] = True
    >>> labelled_mask((3, 2, 2), changed=changed, reviewed=[2]).sum(axis=(1, 2)).tolist()
    [1, 0, 4]
    >>> labelled_mask((3, 2, 2), patches=[(1, 0, 1, 0, 2)]).sum(axis=(1, 2)).tolist()
    [0, 2, 0]
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
    boxes = [tuple(int(v) for v in p) for p in patches]
    problem = patch_problem(boxes, shape)
    if problem:
        raise InputError(problem)
    for z, y0, y1, x0, x1 in boxes:
        plane = (slice(y0, y1), slice(x0, x1))
        mask[(z, *plane) if len(shape) == 3 else plane] = True
    return mask


def as_patches(patches: Iterable[Sequence[int]]) -> set[Patch]:
    """Reviewed patches as a set of ``(z, y0, y1, x0, x1)`` int tuples.

    >>> sorted(as_patches([[1, 0, 4, 0, 4], (1, 0, 4, 0, 4)]))
    [(1, 0, 4, 0, 4)]
    """
    out: set[Patch] = set()
    for p in patches:
        box = tuple(p)
        if len(box) != 5 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                    for v in box):  # fmt: skip
            raise InputError(f"a reviewed patch is (z, y0, y1, x0, x1) in whole numbers, got "
                             f"{str(p)[:60]}")  # fmt: skip
        out.add(tuple(int(v) for v in box))  # type: ignore[arg-type]
    return out


def patch_problem(patches: Iterable[Sequence[int]], shape: tuple[int, ...]) -> str | None:
    """What is wrong with reviewed patches for an image of ``shape`` (None: nothing).

    >>> patch_problem([(0, 0, 4, 0, 4), (3, 0, 4, 0, 4)], (3, 8, 8))
    'reviewed patch (3, 0, 4, 0, 4) is not inside the image (3, 8, 8); unmark it'
    """
    depth = 1 if len(shape) == 2 else shape[0]
    ny, nx = shape[-2:]
    for p in patches:
        box = tuple(p)
        ok = len(box) == 5 and all(isinstance(v, (int, np.integer)) for v in box)
        if ok:
            z, y0, y1, x0, x1 = (int(v) for v in box)
            ok = 0 <= z < depth and 0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx
        if not ok:
            return f"reviewed patch {box} is not inside the image {tuple(shape)}; unmark it"
    return None


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
    patches: Iterable[Sequence[int]] = (),
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
    patches : iterable of (z, y0, y1, x0, x1)
        Reviewed patches of the whole image.

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
    boxes = [tuple(int(v) for v in p) for p in patches]
    problem = patch_problem(boxes, shape)
    if problem:
        raise InputError(problem)
    box_shape = tuple(b - a for a, b in bounds)
    (ya, yb), (xa, xb) = bounds[-2:]
    if len(shape) == 3:
        z0, z1 = bounds[0]
        local = [z - z0 for z in zs if z0 <= z < z1]
    else:
        z0, z1 = 0, 1
        local = sorted(zs)
    inside = [(z - z0 if len(shape) == 3 else 0, max(y0, ya) - ya, min(y1, yb) - ya,
               max(x0, xa) - xa, min(x1, xb) - xa)
              for z, y0, y1, x0, x1 in boxes
              if z0 <= z < z1 and y0 < yb and ya < y1 and x0 < xb and xa < x1]  # fmt: skip
    return labelled_mask(box_shape, changed=changed, reviewed=local, patches=inside)


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
