"""One writer at a time: the OS lock on a project folder and the note of who holds it.

See :mod:`napari_segtool.io.project`. The lock is an OS lock through :mod:`filelock`, so the
OS releases it when its process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_write
from napari_segtool.io.project_checks import is_int

LOCK_FILE = "project.lock"
HOLDER_FILE = "project.lock.json"
#: Seconds a save or a new version waits for another writer's lock before giving up.
WRITE_WAIT = 5.0


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
            and is_int(note.get("pid"))
            and isinstance(note.get("host"), str)
        ):
            return None
        if note["host"] == socket.gethostname() and not _process_alive(note["pid"]):
            return None  # its writer is gone; the new holder has not written its note yet
        note["program"] = note["program"][:80]
        note["host"] = note["host"][:80]
        return note
