"""Errors the Hamming index raises beyond those in `cbir_engine.errors`.

They derive from `CbirError` and `ValueError` like the shared ones, so callers can catch either.
(They belong in `cbir_engine/errors.py`; they live here until that file takes them.)
"""

from __future__ import annotations

from ..errors import CbirError


class IndexArgumentError(CbirError, ValueError):
    """An argument to an index call is out of range (k, radius, method, bits, ...)."""


class DuplicateIdError(IndexArgumentError):
    """`add` was given ids that repeat, or that the index already holds."""


class DeviceUnavailableError(CbirError, RuntimeError):
    """The index was asked to run on a device this machine does not have."""
