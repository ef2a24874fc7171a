"""Project folders: a user's corrections, reviewed slices and model versions for one image.

Layout of a project folder (by default ``<image file>.segtool/`` beside the image)::

    state.npz          labels, the last machine prediction, the painted-voxel mask, and a
                       JSON record (image, reviewed slices, model versions, current version)
    models/v0001.pt    one model file per fine-tuning round
    project.lock       the OS lock of the writer that has the project open
    project.lock.json  who holds it: program, pid, host, since

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

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import filelock
import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_write
from napari_segtool.io.labelled import labelled_mask
from napari_segtool.io.paint import paint_changes

logger = logging.getLogger(__name__)

FORMAT = "napari-segtool-project"
FORMAT_VERSION = 1
STATE_FILE = "state.npz"
LOCK_FILE = "project.lock"
HOLDER_FILE = "project.lock.json"
SUFFIX = ".segtool"
#: Largest label image a project may hold (voxels); checked from the headers before reading.
MAX_VOXELS = 2**32
#: Largest JSON record in ``state.npz`` (bytes).
MAX_RECORD_BYTES = 16 * 2**20
#: Seconds a save or a new version waits for another writer's lock before giving up.
WRITE_WAIT = 5.0
_ARRAYS = ("labels", "machine", "painted", "meta")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def default_project_dir(image_path: str | os.PathLike[str]) -> Path:
    """``<image file>.segtool`` beside the image.

    >>> default_project_dir("/data/stack.tif").as_posix()
    '/data/stack.tif.segtool'
    """
    p = Path(image_path)
    return p.with_name(p.name + SUFFIX)


@dataclass
class ProjectState:
    """Everything the user made for one image.

    Attributes
    ----------
    labels : ndarray
        The current (corrected) label image.
    machine : ndarray
        What the model last wrote; where ``labels`` differs from it the user changed a voxel.
    painted : bool ndarray
        Voxels the user painted (even if painted back to the machine's value).
    reviewed : set of int
        Slices (Z indices; 0 for a 2D image) the user marked as reviewed: they count whole.
    versions : list of dict
        One entry per fine-tuning round: ``version``, ``file`` (relative to the project),
        validation figures, ``promoted`` and what it was trained on.
    current_version : int or None
        The version in use (None: the starting model, named in ``base_model``).
    base_model : str
        The model the project started from: a bundled name, a path inside the project or an
        absolute path (see the module docstring).
    image : dict
        Where the image came from and its shape, to recognise it on reopening.
    """

    labels: NDArray
    machine: NDArray
    painted: NDArray[np.bool_]
    reviewed: set[int] = field(default_factory=set)
    versions: list[dict[str, Any]] = field(default_factory=list)
    current_version: int | None = None
    base_model: str = ""
    image: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, prediction: NDArray, *, base_model: str = "", image: dict | None = None):
        """A fresh state from a machine prediction nobody has touched yet."""
        pred = np.asarray(prediction)
        return cls(
            labels=pred.copy(),
            machine=pred.copy(),
            painted=np.zeros(pred.shape, bool),
            base_model=base_model,
            image=dict(image or {"shape": list(pred.shape)}),
        )

    def __post_init__(self) -> None:
        shapes = {self.labels.shape, self.machine.shape, self.painted.shape}
        if len(shapes) != 1:
            raise InputError(f"labels, machine and painted masks differ in shape: {shapes}")
        self.reviewed = {int(z) for z in self.reviewed}

    def changed(self) -> NDArray[np.bool_]:
        """Voxels the user painted or whose label differs from what the model wrote."""
        return self.painted | (self.labels != self.machine)

    def labelled(self) -> NDArray[np.bool_]:
        """The labelled voxels: changed, painted, or in a reviewed slice.

        The one definition (:func:`~napari_segtool.io.labelled.labelled_mask`): these train
        the model and a re-segmentation leaves them alone.

        Raises
        ------
        InputError
            For a reviewed slice outside the image.
        """
        return labelled_mask(self.labels.shape, changed=self.changed(), reviewed=self.reviewed)

    def protected(self) -> NDArray[np.bool_]:
        """Voxels a re-segmentation must not touch: the :meth:`labelled` ones."""
        return self.labelled()

    def mark_painted(self, atoms: Any) -> int:
        """Record the voxels of napari paint-history atoms as painted; returns how many.

        Atoms are ``(indices, old_values, new_value)`` tuples or objects with ``slice_key``
        and ``mask`` (None: the whole box), as ``Labels.events.paint`` sends them.

        >>> s = ProjectState.start(np.zeros((4, 4), np.uint8))
        >>> s.mark_painted([((np.array([0, 1]), np.array([2, 2])), np.zeros(2), 1)])
        2
        """
        n = 0
        for change in paint_changes(atoms):
            change.mark(self.painted)
            n += change.size
        return n

    def snapshot(self) -> ProjectState:
        """An independent copy (to save in a worker while the user keeps painting)."""
        return ProjectState(
            labels=self.labels.copy(),
            machine=self.machine.copy(),
            painted=self.painted.copy(),
            reviewed=set(self.reviewed),
            versions=[dict(v) for v in self.versions],
            current_version=self.current_version,
            base_model=self.base_model,
            image=dict(self.image),
        )

    def version(self, number: int) -> dict[str, Any]:
        for entry in self.versions:
            if entry["version"] == number:
                return entry
        raise InputError(f"no model version {number} in this project")


# -- checks ------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _inside(folder: Path, relative: str) -> bool:
    """Whether ``folder / relative`` stays inside ``folder`` once symlinks are resolved."""
    if not relative or Path(relative).is_absolute() or "\\" in relative:
        return False
    try:
        root = folder.resolve()
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return resolved != root and resolved.is_relative_to(root)


def base_model_problem(value: object, folder: str | os.PathLike[str]) -> str | None:
    """What is wrong with a ``base_model`` value for a project in ``folder`` (None: nothing).

    See the module docstring for the values allowed.

    >>> base_model_problem("em-membranes-2d", "/p") is None
    True
    >>> base_model_problem("../../elsewhere.pt", "/p")
    "'../../elsewhere.pt' leaves the project folder; give a bundled name or an absolute path"
    """
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if value == "" or (_NAME.fullmatch(value) and value not in {".", ".."}):
        return None
    if Path(value).is_absolute():
        if not Path(value).is_file():
            return f"{value!r} is not an existing model file; pick the starting model again"
        return None
    if not _inside(Path(folder), value):
        return f"{value!r} leaves the project folder; give a bundled name or an absolute path"
    return None


def _record_problems(record: object, shape: tuple[int, ...], folder: Path) -> list[str]:
    """Every problem of a project record for labels of ``shape``; empty when it is sound."""
    if not isinstance(record, dict):
        return ["the record is not a JSON object"]
    if record.get("format") != FORMAT:
        return ["'format': not a napari-segtool project file"]
    version = record.get("format_version")
    if not _is_int(version) or version < 1:
        return [f"'format_version': {version!r} is not a positive integer"]
    if version > FORMAT_VERSION:
        return ["'format_version': written by a newer napari-segtool; update it to open this"]
    problems = []
    if "shape" in record and record["shape"] != list(shape):
        problems.append(f"'shape': {record['shape']!r} but the labels have {list(shape)}")
    depth = 1 if len(shape) == 2 else shape[0]
    reviewed = record.get("reviewed", [])
    if not isinstance(reviewed, list) or not all(_is_int(z) for z in reviewed):
        problems.append(f"'reviewed': {str(reviewed)[:80]} is not a list of slice numbers")
    elif bad := [z for z in reviewed if not 0 <= z < depth]:
        problems.append(f"'reviewed': slices {bad[:8]} are outside 0..{depth - 1}")
    elif len(set(reviewed)) != len(reviewed):
        problems.append("'reviewed': a slice is listed twice")
    versions = record.get("versions", [])
    numbers: list[int] = []
    if not isinstance(versions, list):
        problems.append("'versions': not a list")
        versions = []
    for i, entry in enumerate(versions):
        problem = _version_problem(entry, folder)
        if problem:
            problems.append(f"'versions'[{i}]: {problem}")
        else:
            numbers.append(entry["version"])
    if len(set(numbers)) != len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        problems.append(f"'versions': version numbers {twice[:8]} are listed twice")
    current = record.get("current_version")
    if current is not None and (not _is_int(current) or current not in numbers):
        problems.append(f"'current_version': {current!r} is not one of the versions {numbers}")
    problem = base_model_problem(record.get("base_model", ""), folder)
    if problem:
        problems.append(f"'base_model': {problem}")
    image = record.get("image", {})
    if not isinstance(image, dict):
        problems.append("'image': not a JSON object")
    elif "shape" in image and image["shape"] != list(shape):
        problems.append(f"'image': shape {image['shape']!r} but the labels have {list(shape)}")
    elif bad_keys := [k for k in ("name", "path") if k in image and not isinstance(image[k], str)]:
        problems.append(f"'image': {bad_keys[0]} is not a string")
    return problems


def _version_problem(entry: object, folder: Path) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    number, file, parent = entry.get("version"), entry.get("file"), entry.get("parent")
    reviewed = entry.get("reviewed", [])
    checks = [
        (_is_int(number) and number >= 1, f"'version' {number!r} is not a positive integer"),
        (
            isinstance(file, str) and _inside(folder, file),
            f"'file' {file!r} is not a relative path inside the project folder",
        ),
        (parent is None or _is_int(parent), f"'parent' {parent!r} is not a version number"),
        (
            isinstance(entry.get("promoted", False), bool),
            f"'promoted' {entry.get('promoted')!r} is not true or false",
        ),
        *(
            (
                entry.get(key) is None or _is_number(entry.get(key)),
                f"{key!r} {entry.get(key)!r} is not a number",
            )
            for key in ("val_dice", "baseline_dice")
        ),
        (
            isinstance(reviewed, list) and all(_is_int(z) for z in reviewed),
            "'reviewed' is not a list of slice numbers",
        ),
    ]
    return next((message for ok, message in checks if not ok), None)


def _read_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data size of one ``.npy`` member, from its header alone."""
    info = zf.getinfo(f"{name}.npy")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"{name}: unsupported .npy version {version}")
        header_end = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}: holds Python objects")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_end + nbytes:
        raise ValueError(
            f"{name}: the header says {shape} {dtype} but the member holds "
            f"{info.file_size - header_end} bytes"
        )
    return tuple(shape), dtype, nbytes


def _header_problems(headers: dict[str, tuple[tuple[int, ...], np.dtype, int]]) -> list[str]:
    shape, dtype, _ = headers["labels"]
    problems = []
    if len(shape) not in (2, 3) or min(shape, default=0) < 1:
        return [f"'labels': shape {shape} is not a 2D image or a 3D stack"]
    size = math.prod(shape)
    if size > MAX_VOXELS:
        problems.append(f"'labels': {size:,} voxels is more than {MAX_VOXELS:,}")
    if dtype.kind not in "ui":
        problems.append(f"'labels': dtype {dtype} is not an integer type")
    m_shape, m_dtype, _ = headers["machine"]
    if (m_shape, m_dtype) != (shape, dtype):
        problems.append(f"'machine': {m_shape} {m_dtype} but the labels are {shape} {dtype}")
    p_shape, p_dtype, _ = headers["painted"]
    if p_shape != ((size + 7) // 8,) or p_dtype != np.uint8:
        problems.append(
            f"'painted': {p_shape} {p_dtype}, not the {(size + 7) // 8} bytes of a bit mask "
            f"over {shape}"
        )
    r_shape, r_dtype, r_bytes = headers["meta"]
    if len(r_shape) != 1 or r_dtype != np.uint8 or r_bytes > MAX_RECORD_BYTES:
        problems.append(f"'meta': {r_shape} {r_dtype} is not a JSON record of bytes")
    return problems


# -- the lock ----------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it left no note of who it is)"
    since = ""
    with contextlib.suppress(ValueError, TypeError):
        when = _dt.datetime.fromisoformat(holder.get("since")).astimezone()
        fmt = (
            "%H:%M" if when.date() == _dt.datetime.now().astimezone().date() else "%Y-%m-%d %H:%M"
        )
        since = f", since {when.strftime(fmt)}"
    return f"{holder['program']} (pid {holder['pid']} on {holder['host']}{since})"


class ProjectLock:
    """The exclusive lock on one project folder, shared by every thread of its :class:`Project`.

    Get it from :meth:`Project.lock`; see the module docstring. The lock is an OS lock through
    :mod:`filelock`, so it is released when its process ends, even by ``SIGKILL``; the note
    beside it (``project.lock.json``) is written after the lock is taken and removed before it
    is released, and a note whose lock nobody holds is ignored (:meth:`holder`).
    """

    def __init__(self, folder: Path, *, program: str):
        self.folder = folder
        self.program = program
        self._lock = filelock.FileLock(folder / LOCK_FILE, thread_local=False)
        self._guard = threading.RLock()
        self._session = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (for a session or for a save in progress)."""
        return self._lock.is_locked

    @property
    def note_path(self) -> Path:
        return self.folder / HOLDER_FILE

    def acquire(self, *, timeout: float = 0.0) -> ProjectLock:
        """Hold the project until :meth:`release`; a second call while held does nothing.

        Raises
        ------
        InputError
            When another writer holds the project after ``timeout`` seconds, naming it.
        """
        with self._guard:
            if not self._session:
                self._take(timeout)
                self._session = True
        return self

    def release(self) -> None:
        """Let the project go (saves in progress on other threads finish first)."""
        with self._guard:
            if self._session:
                self._session = False
                self._give()

    def __enter__(self) -> ProjectLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def hold(self, *, timeout: float = WRITE_WAIT) -> Iterator[None]:
        """Hold the lock for one operation (reentrant; shares a session's hold)."""
        with self._guard:
            self._take(timeout)
        try:
            yield
        finally:
            with self._guard:
                self._give()

    def holder(self) -> dict[str, Any] | None:
        """Who holds the project now: ``program``, ``pid``, ``host``, ``since``; None if nobody."""
        if self.held:
            return self._read_note()
        if not self.folder.is_dir():
            return None
        probe = filelock.FileLock(self.folder / LOCK_FILE, thread_local=False)
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            return self._read_note()
        try:  # nobody holds it: a note left by a killed holder is out of date
            with contextlib.suppress(FileNotFoundError):
                self.note_path.unlink()
        finally:
            probe.release()
        return None

    def _take(self, timeout: float) -> None:
        if not (isinstance(timeout, int | float) and 0 <= timeout < math.inf):
            raise InputError(f"lock timeout {timeout!r}: give a number of seconds >= 0")
        first = not self._lock.is_locked
        if first:
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            holder = self._read_note()
            raise InputError(
                f"{self.folder}: the project is open in another writer: held by "
                f"{_describe(holder)}; close it there (or let its round finish) and try again"
            ) from None
        if first:
            try:
                self._write_note()
            except OSError:
                self._lock.release()
                raise

    def _give(self) -> None:
        if self._lock.lock_counter == 1:
            with contextlib.suppress(OSError):
                self.note_path.unlink()
        self._lock.release()

    def _write_note(self) -> None:
        note = {
            "program": self.program,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        data = json.dumps(note).encode()
        atomic_write(self.note_path, lambda fh: fh.write(data))

    def _read_note(self) -> dict[str, Any] | None:
        try:
            with open(self.note_path, "rb") as fh:
                note = json.loads(fh.read(4096).decode())
        except (OSError, ValueError):
            return None
        if not (
            isinstance(note, dict)
            and isinstance(note.get("program"), str)
            and _is_int(note.get("pid"))
            and isinstance(note.get("host"), str)
        ):
            return None
        if note["host"] == socket.gethostname() and not _process_alive(note["pid"]):
            return None  # its writer is gone; the new holder has not written its note yet
        note["program"] = note["program"][:80]
        note["host"] = note["host"][:80]
        return note


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
        return self.folder / STATE_FILE

    def model_path(self, version: int) -> Path:
        return self.folder / "models" / f"v{version:04d}.pt"

    def exists(self) -> bool:
        return self.state_path.exists()

    def file(self, relative: str) -> Path:
        """``folder / relative`` for a path the record names, refusing one that leaves it.

        Raises
        ------
        InputError
            For an absolute path or one that escapes the folder (``..``, a symlink).
        """
        if not isinstance(relative, str) or not _inside(self.folder, relative):
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
        if base_model == "" or _NAME.fullmatch(base_model):
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

    def save(self, state: ProjectState) -> Path:
        """Write the state atomically, under the lock; returns the state file's path.

        Versions are never dropped: versions listed on disk but missing from ``state`` (a
        round recorded since ``state`` was copied) are kept, and added to ``state``; when the
        version in use on disk is one of those, it stays in use.

        Raises
        ------
        InputError
            When another writer holds the project, or when ``state`` would not load again
            (a path outside the folder, a reviewed slice out of range).
        """
        with self._lock.hold(timeout=self.wait):
            return self._save(state, merge=True)

    def _save(self, state: ProjectState, *, merge: bool) -> Path:
        if merge and self.exists():
            try:
                on_disk = self._read(arrays=False)
            except InputError as exc:
                logger.warning("replacing a damaged project file: %s", exc)
            else:
                _catch_up(state, on_disk)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved": _dt.datetime.now(_dt.UTC).isoformat(),
            "reviewed": sorted(state.reviewed),
            "versions": state.versions,
            "current_version": state.current_version,
            "base_model": state.base_model,
            "image": state.image,
            "shape": list(state.labels.shape),
        }
        problems = _record_problems(record, tuple(state.labels.shape), self.folder)
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

    def load(self) -> ProjectState:
        """Read the state back, checking every field first.

        Raises
        ------
        InputError
            Naming the file and the fields: missing, damaged, not a project, from a newer
            version, sizes that disagree or exceed :data:`MAX_VOXELS`, slices or versions out
            of range, paths that leave the project folder.
        """
        return self._read(arrays=True)

    def _read(self, *, arrays: bool) -> ProjectState:
        p = self.state_path
        if not p.exists():
            raise InputError(f"{p}: no project saved here")
        try:
            with open(p, "rb") as raw, zipfile.ZipFile(raw) as zf:
                record, shape, data = _read_members(zf, arrays=arrays)
        except InputError as exc:
            raise InputError(f"{p}: damaged project file: {exc}; restore it from a backup "
                             "or start a new project folder") from None  # fmt: skip
        except Exception as exc:  # any damage to the zip or npy structure
            raise InputError(f"{p}: damaged project file ({type(exc).__name__}: {exc})") from exc
        problems = _record_problems(record, shape, self.folder)
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
            versions=[dict(v) for v in record.get("versions", [])],
            current_version=record.get("current_version"),
            base_model=record.get("base_model", ""),
            image=dict(record.get("image", {})),
        )


def _read_members(
    zf: zipfile.ZipFile, *, arrays: bool
) -> tuple[Any, tuple[int, ...], tuple[NDArray, NDArray, NDArray] | None]:
    """The record, the labels' shape and (``arrays``) the arrays; headers checked first."""
    names = set(zf.namelist())
    missing = [n for n in _ARRAYS if f"{n}.npy" not in names]
    if missing:
        raise InputError(f"{', '.join(repr(n) for n in missing)} missing")
    headers = {name: _read_header(zf, name) for name in _ARRAYS}
    problems = _header_problems(headers)
    if problems:
        raise InputError("; ".join(problems))
    shape = headers["labels"][0]
    record = json.loads(_read_array(zf, "meta").tobytes().decode())
    if not arrays:
        return record, shape, None
    labels = _read_array(zf, "labels")
    machine = _read_array(zf, "machine")
    bits = _read_array(zf, "painted")
    painted = np.unpackbits(bits, count=labels.size).astype(bool).reshape(shape)
    return record, shape, (labels, machine, painted)


def _read_array(zf: zipfile.ZipFile, name: str) -> NDArray:
    fh: IO[bytes]
    with zf.open(f"{name}.npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def _catch_up(state: ProjectState, on_disk: ProjectState) -> None:
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


def merge_untouched(state: ProjectState, prediction: NDArray) -> int:
    """Write a new machine prediction into ``state`` wherever the user has not worked.

    Voxels the user changed or painted and whole reviewed slices keep their labels; elsewhere
    ``labels`` and ``machine`` take the new prediction. Returns the number of voxels whose
    label changed.

    Examples
    --------
    >>> s = ProjectState.start(np.zeros((2, 2, 2), np.uint8))
    >>> s.labels[0, 0, 0] = 2                        # a correction
    >>> s.reviewed.add(1)                             # slice 1 reviewed as it was
    >>> merge_untouched(s, np.ones((2, 2, 2), np.uint8)), s.labels.tolist()
    (3, [[[2, 1], [1, 1]], [[0, 0], [0, 0]]])
    """
    pred = np.asarray(prediction)
    if pred.shape != state.labels.shape:
        raise InputError(
            f"the new prediction {pred.shape} does not match the labels {state.labels.shape}"
        )
    free = ~state.protected()
    changed = int(np.count_nonzero(free & (state.labels != pred)))
    state.labels[free] = pred[free]
    state.machine[free] = pred[free]
    return changed
