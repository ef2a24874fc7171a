"""A cluster run as a generator of progress, for callers that must not block (the widget).

:func:`iter_segment_on_cluster` connects to the scheduler and runs
:func:`~napari_segtool.cluster.run.segment_on_cluster` on a thread of its own, yielding
``(done, total)`` boxes as they finish and returning the run's summary. Cancelling (its
``cancel`` event) stops the run when the next box finishes: the boxes not yet done are
cancelled on the cluster, what was written stays recorded, and the same run started again
resumes it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from typing import Any

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import SegtoolError

__all__ = ["CancelledError", "iter_segment_on_cluster"]

_POLL_S = 0.1


class CancelledError(SegtoolError):
    """The run was cancelled; the finished boxes are kept and a rerun resumes."""


def iter_segment_on_cluster(
    scheduler: str,
    inputs: Sequence[Any],
    model: Any,
    *,
    config: InferenceConfig | None = None,
    cancel: threading.Event | None = None,
    **options: Any,
) -> Generator[tuple[int, int], None, dict[str, Any]]:
    """Segment ``inputs`` on ``scheduler`` (``local:N``, an address or a scheduler file).

    Yields ``(done, total)`` boxes (the first report once the work is submitted), returns
    the summary of :func:`~napari_segtool.cluster.run.segment_on_cluster` with the scheduler's
    address added, and raises :class:`CancelledError` after ``cancel`` is set. ``options`` go to
    :func:`~napari_segtool.cluster.run.segment_on_cluster`.
    """
    from napari_segtool.cluster.run import segment_on_cluster
    from napari_segtool.cluster.scheduler import connect

    reports: queue.Queue[tuple[int, int] | None] = queue.Queue()
    outcome: dict[str, Any] = {}
    stop = cancel or threading.Event()

    def progress(done: int, total: int) -> None:
        reports.put((done, total))
        if stop.is_set() and done < total:
            raise CancelledError("cancelled")

    def body() -> None:
        try:
            with connect(scheduler) as client:
                summary = segment_on_cluster(client, inputs, model, config=config,
                                             progress=progress, **options)  # fmt: skip
                summary["scheduler"] = client.scheduler.address
                outcome["summary"] = summary
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            reports.put(None)

    thread = threading.Thread(target=body, name="segtool-cluster", daemon=True)
    thread.start()
    while True:
        try:
            item = reports.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if item is None:
            break
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]
