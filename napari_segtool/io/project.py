"""Project folders: a user's corrections, reviewed slices and model versions for one image.

Layout of a project folder (by default ``<image file>.segtool/`` beside the image)::

    state.npz          labels, the last machine prediction, the painted-voxel mask, and a
                       JSON record (image, reviewed slices, model versions, current version)
    models/v0001.pt    one model file per fine-tuning round
    project.lock       the OS lock of the writer that has the project open
    project.lock.json  who holds it: program, pid, host, since

or, for an image larger than memory (a *chunked* project, :meth:`Project.create_chunked`),
``state.json`` (the same record, ``"storage": "chunked"``) and ``state.zarr/`` (the three
arrays as zarr v3 arrays, read and written a chunk at a time) in place of ``state.npz``; see
:mod:`napari_segtool.io.chunked_state` for its files, what a save writes and what a kill
leaves. :meth:`Project.load` returns a
:class:`~napari_segtool.io.chunked_state.ChunkedState` for such a folder, a
:class:`ProjectState` otherwise; a folder holding both files is refused.

``state.npz`` is one file written atomically (temporary file, fsync, rename), so the labels,
the record of what the user touched and the list of versions always belong together, and a
crash or kill mid-save leaves the previous save intact. Model files are written (atomically)
before the state that names them. Loading never unpickles (``allow_pickle=False``).

Files are hostile until checked: :meth:`Project.load` reads the array headers first and checks
shapes, dtypes and sizes against each other and against :data:`MAX_VOXELS` before it reads any
data, then checks every field of the record; any damage is one :class:`InputError` naming the
file and the fields. Every path the record names stays inside the project folder (symlinks
resolved): a version's ``file`` is a relative path inside the folder. ``base_model`` is one of

* ``""``: no starting model;
* a bare name without a path separator (``"em-membranes-2d"``): a bundled model, or else a file
  of that name in the project folder;
* a relative path with a separator: a file inside the project folder (``..`` may not escape);
* an absolute path: a model file the user picked outside the project; it must exist as a
  regular file when the project is saved and loaded.

One writer at a time: :meth:`Project.lock` takes an exclusive lock on the folder (an OS lock
through :mod:`filelock`, released by the OS when its process dies, however it dies) and
writes who holds it beside it. A second writer, in this process or another, gets an
:class:`InputError` naming the holder. Every save, and every new version
(:meth:`Project.add_version`: claiming the number, writing the model file, recording it),
runs under the lock, taking it for the call when the session does not already hold it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_write
from napari_segtool.io.chunked_state import (
    RECORD_FILE,
    STORE_DIR,
    ChunkedState,
    check_store,
    record_text,
)
from napari_segtool.io.labelled import as_patches
from napari_segtool.io.lock import HOLDER_FILE, LOCK_FILE, WRITE_WAIT, ProjectLock
from napari_segtool.io.project_checks import (
    FORMAT,
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    MAX_VOXELS,
    NAME,
    base_model_problem,
    inside,
    read_json_file,
    read_members,
    record_problems,
)
from napari_segtool.io.project_state import ProjectState, merge_untouched

logger = logging.getLogger(__name__)

STATE_FILE = "state.npz"
SUFFIX = ".segtool"
#: The ``storage`` value of a chunked project's record.
CHUNKED = "chunked"

AnyState = ProjectState | ChunkedState
"""A project's state in either format."""

__all__ = [
    "CHUNKED",
    "FORMAT",
    "FORMAT_VERSION",
    "HOLDER_FILE",
    "LOCK_FILE",
    "MAX_RECORD_BYTES",
    "MAX_VOXELS",
    "RECORD_FILE",
    "STATE_FILE",
    "STORE_DIR",
    "SUFFIX",
    "WRITE_WAIT",
    "AnyState",
    "ChunkedState",
    "Project",
    "ProjectLock",
    "ProjectState",
    "base_model_problem",
    "default_project_dir",
    "merge_untouched",
]


def default_project_dir(image_path: str | os.PathLike[str]) -> Path:
    """``<image file>.segtool`` beside the image.

    >>> default_project_dir("/data/stack.tif").as_posix()
    '/data/stack.tif.segtool'
    """
    p = Path(image_path)
    return p.with_name(p.name + SUFFIX)


# -- the project -------------------------------------------------------------------------------


class Project:
    """A project folder; see the module docstring for its layout, checks and locking.

    Parameters
    ----------
    folder : path
        The project folder (created on the first save).
    program : str, optional
        Who this writer is, for the lock's note (``"napari-segtool"``, ``"napari-segtool
        finetune"``): another writer's refusal names it.
    wait : float, optional
        Seconds a save or a new version waits for another writer's lock (default
        :data:`WRITE_WAIT`); a session lock (:meth:`lock`) does not wait unless asked.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        program: str = "napari-segtool",
        wait: float = WRITE_WAIT,
    ):
        self.folder = Path(folder)
        self.wait = wait
        self._lock = ProjectLock(self.folder, program=program)

    @property
    def state_path(self) -> Path:
        """The file holding the record: ``state.json`` for a chunked project, else
        ``state.npz``."""
        chunked = self.folder / RECORD_FILE
        return chunked if chunked.exists() else self.folder / STATE_FILE

    @property
    def chunked(self) -> bool:
        """Whether the folder holds a chunked project (``state.json`` and ``state.zarr``)."""
        return (self.folder / RECORD_FILE).exists()

    def model_path(self, version: int) -> Path:
        return self.folder / "models" / f"v{version:04d}.pt"

    def exists(self) -> bool:
        return self.state_path.exists()

    def create_chunked(
        self,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        *,
        chunks: tuple[int, ...] | None = None,
        labels: Any = None,
        machine: Any = None,
        base_model: str = "",
        image: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ChunkedState:
        """Start a chunked project here (for an image larger than memory), under the lock.

        Parameters
        ----------
        shape, dtype : optional
            The labels' shape and integer dtype (from ``labels`` or ``machine`` if given).
        chunks : tuple of int, optional
            Chunk shape (default :data:`~napari_segtool.io.chunked_state.DEFAULT_CHUNKS`).
        labels, machine : array-like, optional
            The starting labels and the machine prediction (numpy, zarr, dask), written a
            box at a time; see :meth:`ChunkedState.create`.
        base_model, image : optional
            As in the record of :class:`ProjectState`.
        progress : callable, optional
            ``progress(done, total)`` per box written.

        Returns
        -------
        ChunkedState
            Its arrays on disk; save it with :meth:`save` like any state.

        Raises
        ------
        InputError
            When a project is saved here already, another writer holds the folder, or the
            layout, ``base_model`` or ``image`` would not load again.
        """
        with self._lock.hold(timeout=self.wait):
            if self.exists():
                raise InputError(
                    f"{self.state_path}: a project is saved here already; open it, or choose "
                    "another folder"
                )
            source = labels if labels is not None else machine
            size = tuple(source.shape) if source is not None else tuple(shape or ())
            record = self._record_of(reviewed=[], versions=[], current_version=None,
                                     base_model=base_model, image=dict(image or {}),
                                     shape=list(size))  # fmt: skip
            problems = record_problems(record, size, self.folder)
            if problems:
                raise InputError(f"{self.folder}: not created: " + "; ".join(problems))
            state = ChunkedState.create(
                self.folder, shape=shape, dtype=dtype, chunks=chunks, labels=labels,
                machine=machine, base_model=base_model, image=image, progress=progress,
            )  # fmt: skip
            self._save(state, merge=False)
            return state

    def file(self, relative: str) -> Path:
        """``folder / relative`` for a path the record names, refusing one that leaves it.

        Raises
        ------
        InputError
            For an absolute path or one that escapes the folder (``..``, a symlink).
        """
        if not isinstance(relative, str) or not inside(self.folder, relative):
            raise InputError(
                f"{relative!r} is not a relative path inside the project folder {self.folder}"
            )
        return self.folder / relative

    def base_model_path(self, base_model: str) -> Path | None:
        """The file a ``base_model`` value names, or None for ``""`` and bare names.

        A bare name is a bundled model, or else a file of that name in the project folder
        (the caller, which knows the bundled names, decides); see the module docstring.

        Raises
        ------
        InputError
            For a value the rules refuse.
        """
        problem = base_model_problem(base_model, self.folder)
        if problem:
            raise InputError(f"base_model: {problem}")
        if base_model == "" or NAME.fullmatch(base_model):
            return None
        if Path(base_model).is_absolute():
            return Path(base_model)
        return self.folder / base_model

    # -- locking -------------------------------------------------------------------------------

    def lock(self, *, timeout: float = 0.0) -> ProjectLock:
        """Hold the project for this writer's session; returns the (context-manager) lock.

        The GUI holds it while the project is open, a command line round for the round::

            with project.lock():
                ...

        Calling it again while held does nothing; :meth:`unlock` (or leaving the ``with``)
        lets it go, and so does dropping the last reference to this :class:`Project` (keep it,
        e.g. as the widget's attribute, while the project is open). Saves and new versions
        from any thread of this object share the hold.

        Raises
        ------
        InputError
            When another writer (another window, process or :class:`Project` object) holds
            the project after ``timeout`` seconds; the message names it: ``held by
            napari-segtool (pid 1234 on host, since 10:32)``.
        """
        return self._lock.acquire(timeout=timeout)

    def unlock(self) -> None:
        """Release the session lock taken by :meth:`lock` (nothing if not held)."""
        self._lock.release()

    @property
    def locked(self) -> bool:
        """Whether this object holds the project's lock now."""
        return self._lock.held

    def holder(self) -> dict[str, Any] | None:
        """Who holds the project (``program``, ``pid``, ``host``, ``since``), None if nobody."""
        return self._lock.holder()

    # -- versions ------------------------------------------------------------------------------

    def next_version(self, state: ProjectState) -> int:
        """The first version number above every listed one and every model file on disk.

        Only reliable under the lock: :meth:`add_version` claims numbers safely.
        """
        return self._next_number(state.versions)

    def _next_number(self, versions: list[dict[str, Any]]) -> int:
        used = [v["version"] for v in versions]
        on_disk = [
            int(p.stem[1:]) for p in (self.folder / "models").glob("v*.pt") if p.stem[1:].isdigit()
        ]
        return max([0, *used, *on_disk]) + 1

    def add_version(
        self,
        state: ProjectState,
        write_model: Callable[[Path, int], object],
        entry: dict[str, Any],
        *,
        promote: bool,
        save: bool = True,
    ) -> dict[str, Any]:
        """Claim a version number, write its model file and record it, all under the lock.

        Parameters
        ----------
        state : ProjectState
            The caller's state; its ``versions`` and ``current_version`` are updated.
        write_model : callable
            ``write_model(path, version)`` writes the model file (atomically) at ``path``.
        entry : dict
            The version's figures; ``version`` and ``file`` are added.
        promote : bool
            Make it the current version.
        save : bool, optional
            True: ``state`` is current (its labels are what the user has now) and is saved
            with the new version. False: ``state`` may be older than the project on disk (a
            snapshot from the start of a round); only the version list and current version on
            disk change, the labels saved there stay.

        Returns
        -------
        dict
            The new version's entry.
        """
        with self._lock.hold(timeout=self.wait):
            on_disk = self._read(arrays=not save) if self.exists() else None
            if on_disk is not None:
                _catch_up(state, on_disk)
            known = state.versions
            version = self._next_number(known)
            path = self.model_path(version)
            write_model(path, version)
            figures = {k: v for k, v in entry.items() if k not in ("version", "file")}
            entry = {"version": version, "file": path.relative_to(self.folder).as_posix()}
            entry.update(figures)
            target = state if save or on_disk is None else on_disk
            target.versions = [*known, entry]
            if promote:
                target.current_version = version
            self._save(target, merge=False)
            state.versions = [dict(v) for v in target.versions]
            state.current_version = target.current_version
        return entry

    # -- saving and loading --------------------------------------------------------------------

    def save(self, state: AnyState) -> Path:
        """Write the state atomically, under the lock; returns the state file's path.

        Versions are never dropped: versions listed on disk but missing from ``state`` (a
        round recorded since ``state`` was copied) are kept, and added to ``state``; when the
        version in use on disk is one of those, it stays in use.

        A :class:`~napari_segtool.io.chunked_state.ChunkedState` (its arrays are already on
        disk) has the chunk files written since its last save flushed to disk, then its
        record written atomically to ``state.json``.

        Raises
        ------
        InputError
            When another writer holds the project, when ``state`` would not load again
            (a path outside the folder, a reviewed slice out of range), or when its format
            is not the folder's (a chunked state of another folder, an in-memory state for
            a chunked folder).
        """
        with self._lock.hold(timeout=self.wait):
            return self._save(state, merge=True)

    def _record_of(self, **fields: Any) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved": _dt.datetime.now(_dt.UTC).isoformat(),
            **fields,
        }

    def _save(self, state: AnyState, *, merge: bool) -> Path:
        self._check_storage(state)
        if merge and self.exists():
            try:
                on_disk = self._read(arrays=False)
            except InputError as exc:
                logger.warning("replacing a damaged project file: %s", exc)
            else:
                _catch_up(state, on_disk)
        record = self._record_of(
            reviewed=sorted(state.reviewed),
            reviewed_patches=[list(b) for b in sorted(state.reviewed_patches)],
            versions=state.versions,
            current_version=state.current_version,
            base_model=state.base_model,
            image=state.image,
            shape=list(state.labels.shape),
        )
        problems = record_problems(record, tuple(state.labels.shape), self.folder)
        if isinstance(state, ChunkedState):
            path = self.folder / RECORD_FILE
            if problems:
                raise InputError(f"{path}: not saved: " + "; ".join(problems))
            record["storage"] = CHUNKED
            state.sync()  # the chunks first: the record never names what is not on disk
            return atomic_write(path, lambda fh: fh.write(record_text(record)))
        if problems:
            raise InputError(f"{self.state_path}: not saved: " + "; ".join(problems))
        meta = np.frombuffer(json.dumps(record).encode(), np.uint8)
        # copies first, so painting on the UI thread during the write cannot tear the save
        arrays = {
            "labels": np.array(state.labels, copy=True),
            "machine": np.array(state.machine, copy=True),
            "painted": np.packbits(state.painted, axis=None),
            "meta": meta,
        }
        return atomic_write(self.state_path, lambda fh: np.savez_compressed(fh, **arrays))

    def load(self) -> AnyState:
        """Read the state back, checking every field first.

        A chunked project's arrays are opened, not read (:class:`ChunkedState`); its store's
        files are listed once (no links allowed) and, when this object holds the lock,
        temporaries a killed writer left are removed.

        Raises
        ------
        InputError
            Naming the file and the fields: missing, damaged, not a project, from a newer
            version, sizes that disagree or exceed :data:`MAX_VOXELS`, slices or versions out
            of range, paths that leave the project folder.
        """
        return self._read(arrays=True)

    def _check_storage(self, state: AnyState) -> None:
        """Refuse a state whose format is not this folder's."""
        if isinstance(state, ChunkedState):
            if not _same_folder(state.folder, self.folder):
                raise InputError(
                    f"this chunked state's arrays are in {state.folder}, not in {self.folder}; "
                    "save it with its own project"
                )
            if (self.folder / STATE_FILE).exists():
                raise InputError(
                    f"{self.folder / STATE_FILE}: this project is stored in memory-sized form; "
                    "a chunked state cannot be saved into it"
                )
        elif self.chunked:
            raise InputError(
                f"{self.folder / RECORD_FILE}: this project is chunked; save its chunked "
                "state (Project.load()), not an in-memory one"
            )

    def _read_chunked(self, *, walk: bool) -> ChunkedState:
        p = self.folder / RECORD_FILE
        if (self.folder / STATE_FILE).exists():
            raise InputError(
                f"{self.folder}: holds both {STATE_FILE} and {RECORD_FILE}; move the one you "
                "do not want out of the folder"
            )
        try:
            record = read_json_file(p, limit=MAX_RECORD_BYTES)
        except (OSError, ValueError) as exc:  # also bad UTF-8 or JSON
            raise InputError(f"{p}: damaged project file ({type(exc).__name__}: {exc})") from None
        shape = check_store(self.folder / STORE_DIR)
        problems = record_problems(record, shape, self.folder)
        if not problems and record.get("storage") != CHUNKED:
            problems = [f"'storage': {str(record.get('storage'))[:20]!r} is not {CHUNKED!r}"]
        if problems:
            if problems[0].startswith("'format"):
                raise InputError(f"{p}: {problems[0]}")
            raise InputError(f"{p}: damaged project file: " + "; ".join(problems))
        return ChunkedState.open(self.folder, record, walk=walk, remove_stale=walk and self.locked)

    def _read(self, *, arrays: bool) -> AnyState:
        if self.chunked:
            return self._read_chunked(walk=arrays)
        p = self.state_path
        if not p.exists():
            raise InputError(f"{p}: no project saved here")
        try:
            with open(p, "rb") as raw, zipfile.ZipFile(raw) as zf:
                record, shape, data = read_members(zf, arrays=arrays)
        except InputError as exc:
            raise InputError(f"{p}: damaged project file: {exc}; restore it from a backup "
                             "or start a new project folder") from None  # fmt: skip
        except Exception as exc:  # any damage to the zip or npy structure
            raise InputError(f"{p}: damaged project file ({type(exc).__name__}: {exc})") from exc
        problems = record_problems(record, shape, self.folder)
        if problems:
            if problems[0].startswith("'format"):
                raise InputError(f"{p}: {problems[0]}")
            raise InputError(f"{p}: damaged project file: " + "; ".join(problems))
        if data is None:  # the record only: read-only stand-ins that allocate nothing
            empty = np.broadcast_to(np.zeros((), np.uint8), shape)
            data = (empty, empty, np.broadcast_to(np.zeros((), bool), shape))
        labels, machine, painted = data
        return ProjectState(
            labels=labels,
            machine=machine,
            painted=painted,
            reviewed=set(record.get("reviewed", [])),
            reviewed_patches=as_patches(record.get("reviewed_patches", [])),
            versions=[dict(v) for v in record.get("versions", [])],
            current_version=record.get("current_version"),
            base_model=record.get("base_model", ""),
            image=dict(record.get("image", {})),
        )


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _catch_up(state: AnyState, on_disk: AnyState) -> None:
    """Give ``state`` the versions recorded on disk since it was copied (never dropping one)."""
    seen = {v["version"] for v in state.versions}
    if on_disk.current_version is not None and on_disk.current_version not in seen:
        # promoted since ``state`` was copied: its writer cannot have chosen against it
        state.current_version = on_disk.current_version
    state.versions = _merge_versions(on_disk.versions, state.versions)


def _merge_versions(*lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Version entries of all lists, one per number (the later list wins), by number."""
    merged: dict[int, dict[str, Any]] = {}
    for versions in lists:
        for entry in versions:
            merged[entry["version"]] = dict(entry)
    return [merged[n] for n in sorted(merged)]
