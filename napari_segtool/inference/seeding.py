"""Seeded torch randomness (dropout) without touching torch's global generator.

Core code never calls ``torch.manual_seed``: a user's script, a test or another widget may
rely on the global state. :class:`TorchRandom` keeps its own generator states and lends them
to torch only inside :meth:`TorchRandom.active` (through :func:`torch.random.fork_rng`, which
puts the global state back afterwards), so a seeded run is reproducible and leaves the rest
of the process as it was, also across the ``yield`` of a generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

__all__ = ["TorchRandom"]


class TorchRandom:
    """Private torch random state for one seeded run on ``device``.

    Examples
    --------
    >>> before = torch.get_rng_state()
    >>> rand = TorchRandom(7, torch.device("cpu"))
    >>> with rand.active():
    ...     a = torch.rand(2)
    >>> bool(torch.equal(before, torch.get_rng_state()))
    True
    >>> with TorchRandom(7, torch.device("cpu")).active():
    ...     bool(torch.equal(a, torch.rand(2)))
    True
    """

    def __init__(self, seed: int, device: torch.device):
        self._cuda = device.type == "cuda"
        self._index = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if self._cuda
            else None
        )
        with self._forked():
            torch.manual_seed(seed)
            self._save()

    def _forked(self) -> AbstractContextManager[None]:
        devices = [self._index] if self._cuda else []
        return torch.random.fork_rng(devices=devices)

    def _save(self) -> None:
        self._cpu_state = torch.get_rng_state()
        self._cuda_state = torch.cuda.get_rng_state(self._index) if self._cuda else None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block with this run's random state; the global state is kept aside."""
        with self._forked():
            torch.set_rng_state(self._cpu_state)
            if self._cuda_state is not None:
                torch.cuda.set_rng_state(self._cuda_state, self._index)
            try:
                yield
            finally:
                self._save()
