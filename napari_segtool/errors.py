"""Exceptions raised for bad input; their messages name the bad value and the fix."""

from __future__ import annotations


class SegtoolError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(SegtoolError, ValueError):
    """An image, label image, option or shape that cannot be used as given."""


class CheckpointError(SegtoolError, ValueError):
    """A model file that is missing, damaged, foreign or incompatible."""
