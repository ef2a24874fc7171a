"""Available memory, and a check to run before any large allocation a file asks for.

A few bytes of header can ask for gigabytes (a 2.8 MB TIFF that says 50000 x 50000 float64,
a label id of 65535 that would size a table). Code that allocates from sizes read in a file
calls :func:`check_allocation` first, so the user gets a message instead of a swap storm or
the out-of-memory killer.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari_segtool.errors import InputError

#: Share of the available memory that one allocation (or one operation's peak) may take.
MEMORY_FRACTION = 0.8

_MEMINFO = Path("/proc/meminfo")


# cgroup v2 and v1 files of a container's memory limit and use (limit file, usage file)
_CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ),
)


def _cgroup_headroom() -> int | None:
    """Bytes left under a container's memory limit, or None without a limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            text = limit_file.read_text().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 1 << 60:  # cgroup v1 writes "no limit" as a huge number
                return None
            return max(0, limit - int(usage_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int:
    """Bytes of memory available to new allocations without swapping.

    Linux: ``MemAvailable`` from ``/proc/meminfo`` (free memory plus reclaimable caches), or
    less when a container's cgroup limit leaves less. Elsewhere: free physical pages from
    :func:`os.sysconf`, or ``psutil.virtual_memory().available`` when psutil is installed.

    Returns
    -------
    int
        Bytes; a large number (no bound) when the platform does not say.
    """
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                headroom = _cgroup_headroom()
                return available if headroom is None else min(available, headroom)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil is optional; any failure means "unknown"
        return 1 << 62


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, one decimal.

    >>> format_bytes(18.6 * 2**30)
    '18.6 GiB'
    >>> format_bytes(12)
    '12 B'
    """
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def check_allocation(
    nbytes: int,
    *,
    what: str,
    hint: str | None = None,
    fraction: float = MEMORY_FRACTION,
) -> None:
    """Refuse an allocation that would not fit in the available memory.

    Parameters
    ----------
    nbytes : int
        Bytes the allocation (or the operation's estimated peak) needs.
    what : str
        What needs them, e.g. ``"image.tif: a 50000 x 50000 float64 array"``; starts the
        message.
    hint : str, optional
        How to get around it (tiling, a crop, the larger-than-memory path); ends the message.
    fraction : float
        Share of :func:`available_memory` that may be used.

    Raises
    ------
    InputError
        When ``nbytes`` exceeds ``fraction`` of the available memory; the message names both
        sizes.

    Examples
    --------
    >>> check_allocation(1024, what="a small table")
    >>> check_allocation(1 << 60, what="a huge table")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_segtool.errors.InputError: a huge table needs 1024.0 PiB but ...
    """
    available = available_memory()
    if nbytes <= fraction * available:
        return
    message = (
        f"{what} needs {format_bytes(nbytes)} but only {format_bytes(available)} of memory is "
        f"available (at most {fraction:.0%} of it is used for one operation)"
    )
    raise InputError(f"{message}; {hint}" if hint else message)
