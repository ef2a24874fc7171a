"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A write goes to a temporary file ``.<name>.<random>.tmp`` beside the target, which is flushed
and fsynced, renamed onto the target, and then the folder itself is fsynced so that the rename
survives a power cut. While it writes, the writer holds an exclusive OS lock
(:func:`fcntl.flock`) on its temporary file; the lock goes away with the process, however it
ends. Temporaries left by a killed writer are removed on the next atomic write to the same
target: a temporary is stale when nobody holds its lock and it was last modified more than
:data:`FRESH_SECONDS` ago (the grace period covers the instant between creating a temporary
and locking it). Where :mod:`fcntl` is missing (Windows) only temporaries older than
:data:`STALE_SECONDS` are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: A temporary modified this recently is never removed (its writer may be about to lock it).
FRESH_SECONDS = 1.0
#: Without OS locks (Windows), temporaries older than this are taken for a dead writer's.
STALE_SECONDS = 3600.0


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    # mkstemp's random part is letters, digits and underscores; no dots, so the temporaries of
    # "a.tif.x" never match those of "a.tif"
    return re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]+\.tmp")


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking OS lock on ``fd``; False when another holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed writers left beside ``path``; returns them.

    A temporary is removed only when no live process holds its lock and it is older than
    :data:`FRESH_SECONDS` (:data:`STALE_SECONDS` where OS locks are unavailable), so a
    concurrent writer's temporary is never touched. Errors are logged, never raised: cleaning
    up must not fail a save.
    """
    target = Path(path)
    pattern = _temporary_pattern(target)
    removed: list[Path] = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    now = time.time()
    min_age = FRESH_SECONDS if fcntl is not None else STALE_SECONDS
    for name in names:
        if not pattern.fullmatch(name):
            continue
        tmp = target.parent / name
        try:
            info = os.lstat(tmp)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < min_age:
                continue
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError as exc:
            logger.warning("could not remove the stale temporary %s: %s", tmp, exc)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d stale temporaries beside %s", len(removed), target)
    return removed


def fsync_directory(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where that is impossible."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:  # pragma: no cover - Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some file systems refuse fsync on folders
        logger.debug("could not fsync the folder %s: %s", folder, exc)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary file is flushed to disk before :func:`os.replace`, and the folder after it,
    so a crash or kill at any point leaves either the previous file intact or the complete new
    one. On an exception the temporary file is removed and ``path`` is untouched. Temporaries
    that killed writers left beside ``path`` are removed first
    (:func:`remove_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    lock_fd: int | None = fd
    if fcntl is None:  # pragma: no cover - Windows cannot rename a file that is open
        os.close(fd)
        lock_fd = None
    try:
        if lock_fd is not None:
            # held until the end: tells remove_stale_temporaries that this writer is alive
            _try_lock(lock_fd)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the mode of the file it replaces, or
        # the usual mode for a new file
        mode = target.stat().st_mode & 0o777 if target.exists() else _default_mode()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
        fsync_directory(target.parent)
    finally:
        try:
            if tmp_path.exists():
                tmp_path.unlink()
        finally:
            if lock_fd is not None:
                os.close(lock_fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(fh)`` on a temporary binary file and move it onto ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
    return Path(path)
