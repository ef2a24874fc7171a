"""The record of a block-parallel run, kept inside its labels store.

A run's labels store (an OME-Zarr image) holds a zarr group ``segtool_run`` beside its
levels: the settings the run was started with (its attributes), and one entry per box of the
block grid in small zarr arrays, each entry its own chunk, so a worker records a finished box
by writing one chunk (zarr's local store writes a chunk to a temporary file and renames it:
the record is there whole or not at all). ``done[i]`` is 0 (to do), 1 (computed) or 2
(skipped as empty); ``counts[i]`` the voxels given to each class; ``attempts[i]`` how often a
worker started the box. A box is recorded only after all its outputs are written, so a rerun
recomputes every box that was not finished, and only those. OME-Zarr readers (napari-ome-zarr,
ome-zarr) read the levels named in the metadata and ignore the group.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = ["RUN_GROUP", "RunRecord", "settings_digest"]

RUN_GROUP = "segtool_run"
RECORD_VERSION = 1
TODO, COMPUTED, SKIPPED = 0, 1, 2


def settings_digest(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class RunRecord:
    """The ``segtool_run`` group of a labels store: settings and per-box state."""

    def __init__(self, group: Any, path: Path) -> None:
        self.group, self.path = group, path
        self.done = group["done"]
        self.counts = group["counts"]
        self.attempts = group["attempts"]

    @property
    def n_boxes(self) -> int:
        return int(self.done.shape[0])

    @classmethod
    def create(
        cls, store: str | Path, *, settings: dict[str, Any], resolved: dict[str, Any],
        n_boxes: int, n_classes: int,
    ) -> RunRecord:  # fmt: skip
        """Add the record to a new labels store."""
        import zarr

        p = Path(store)
        root = zarr.open_group(p, mode="r+")
        g = root.create_group(RUN_GROUP)
        g.create_array("done", shape=(n_boxes,), chunks=(1,), dtype="uint8", fill_value=0)
        g.create_array("counts", shape=(n_boxes, n_classes), chunks=(1, n_classes),
                       dtype="int64", fill_value=0)  # fmt: skip
        g.create_array("attempts", shape=(n_boxes,), chunks=(1,), dtype="uint16", fill_value=0)
        g.attrs.update({
            "version": RECORD_VERSION,
            "settings": settings,
            "digest": settings_digest(settings),
            "resolved": resolved,
            "complete": False,
        })  # fmt: skip
        return cls(g, p)

    @classmethod
    def open(cls, store: str | Path) -> RunRecord | None:
        """The record of an existing store, or None when it has none (not a run's output)."""
        import zarr

        p = Path(store)
        try:
            root = zarr.open_group(p, mode="r+")
            if RUN_GROUP not in root:
                return None
            g = root[RUN_GROUP]
        except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{p}: not a readable zarr store ({exc})") from exc
        attrs = dict(g.attrs)
        if attrs.get("version") != RECORD_VERSION or not isinstance(attrs.get("settings"), dict):
            raise InputError(f"{p}: its run record is damaged or from another version; pass "
                             "--overwrite to start again")  # fmt: skip
        try:
            return cls(g, p)
        except KeyError as exc:
            raise InputError(f"{p}: its run record is damaged ({exc}); pass --overwrite") from exc

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["settings"])

    @property
    def digest(self) -> str:
        return str(self.group.attrs["digest"])

    @property
    def resolved(self) -> dict[str, Any]:
        return dict(self.group.attrs["resolved"])

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def set_complete(self, summary: dict[str, Any]) -> None:
        self.group.attrs.update({"complete": True, "summary": summary})

    def state(self) -> NDArray[np.uint8]:
        """``done`` for every box (reads the small record array)."""
        return np.asarray(self.done[:])

    def started(self, index: int) -> int:
        """Count one more start of box ``index``; how many starts that makes."""
        n = int(self.attempts[index]) + 1
        self.attempts[index] = n
        return n

    def finish(self, index: int, counts: NDArray[np.int64], *, skipped: bool = False) -> None:
        """Record box ``index`` as done (after all its outputs are written)."""
        self.counts[index] = np.asarray(counts, np.int64)
        self.done[index] = SKIPPED if skipped else COMPUTED

    def total_counts(self) -> NDArray[np.int64]:
        return np.asarray(self.counts[:]).sum(axis=0)

    def mismatch(self, settings: dict[str, Any]) -> list[str]:
        """The settings that differ from the record's (empty: the same run)."""
        old = self.settings
        keys = sorted(set(old) | set(settings))
        return [k for k in keys if json.dumps(old.get(k), sort_keys=True)
                != json.dumps(settings.get(k), sort_keys=True)]  # fmt: skip
