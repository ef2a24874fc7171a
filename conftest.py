"""Shared test set-up: the speed cache lives in a temporary folder, never in the user's home."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _speed_cache(tmp_path_factory):
    """Point ``NAPARI_SEGTOOL_CACHE_DIR`` at one temporary folder for the whole run."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NAPARI_SEGTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("speed-cache")))
    yield
    mp.undo()
