"""Connect to a dask.distributed cluster from a ``--scheduler`` value."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from napari_segtool.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULER_HELP", "connect", "parse_scheduler"]

SCHEDULER_HELP = (
    "run the blocks as dask tasks on a cluster: local:N starts a LocalCluster of N worker "
    "processes on this machine (127.0.0.1); tcp://HOST:PORT connects to a running `dask "
    "scheduler`; a path names a scheduler file (`dask scheduler --scheduler-file F`, or "
    "dask-jobqueue's). Without it the work runs in this process"
)


def parse_scheduler(value: str) -> tuple[str, Any]:
    """``("local", n)``, ``("address", "tcp://...")`` or ``("file", Path)``.

    Examples
    --------
    >>> parse_scheduler("local:2")
    ('local', 2)
    >>> parse_scheduler("tcp://127.0.0.1:8786")
    ('address', 'tcp://127.0.0.1:8786')
    """
    text = value.strip()
    if text.startswith("local:") or text == "local":
        count = text.partition(":")[2] or str(max(1, (os.cpu_count() or 1) // 2))
        try:
            n = int(count)
        except ValueError:
            n = 0
        if not 1 <= n <= 512:
            raise InputError(f"--scheduler {value}: local:N needs N workers, 1 to 512")
        return "local", n
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in ("tcp", "tls", "inproc", "ucx", "ws", "wss"):
            raise InputError(f"--scheduler {value}: unknown protocol {scheme!r}; give "
                             "tcp://HOST:PORT")  # fmt: skip
        return "address", text
    path = Path(text)
    if path.is_file():
        return "file", path
    raise InputError(
        f"--scheduler {value}: not local:N, a tcp://HOST:PORT address, or an existing "
        "scheduler file"
    )


@contextmanager
def connect(value: str, *, timeout: float = 20.0) -> Iterator[Any]:
    """A ``distributed.Client`` for ``value`` (:func:`parse_scheduler`), closed afterwards
    (with the LocalCluster it started, if any)."""
    kind, target = parse_scheduler(value)
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise InputError("--scheduler needs the 'distributed' package") from exc
    cluster = None
    quiet = logging.getLogger("distributed")
    level = quiet.level
    if not logger.isEnabledFor(logging.DEBUG):  # dask's own INFO lines only with -vv
        quiet.setLevel(logging.WARNING)
    try:
        if kind == "local":
            # a free port for the scheduler's HTTP server (the dashboard when bokeh is
            # there): None would mean dask's default 8787, taken by any other cluster here
            cluster = distributed.LocalCluster(
                n_workers=target, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
            )  # fmt: skip
            client = distributed.Client(cluster, timeout=timeout)
        elif kind == "address":
            client = distributed.Client(target, timeout=timeout)
        else:
            client = distributed.Client(scheduler_file=str(target), timeout=timeout)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        quiet.setLevel(level)
        raise InputError(f"--scheduler {value}: cannot reach the scheduler ({exc})") from exc
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        quiet.setLevel(level)


def has_bokeh() -> bool:
    """Whether dask's dashboard can be served here (it needs bokeh)."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True
