"""Typed errors. Every error the engine raises on bad input is one of these."""

from __future__ import annotations


class CbirError(Exception):
    """Base class of every error cbir-engine raises on purpose."""


class ModelFormatError(CbirError, ValueError):
    """The model file or bytes are not a readable, well-formed ONNX model."""


class UnsupportedOpError(CbirError, NotImplementedError):
    """The graph uses an operator (or an attribute value of one) the engine does not run."""

    def __init__(self, op_type: str, node: str = "", opset: int | None = None, detail: str = ""):
        self.op_type = op_type
        self.node = node
        self.opset = opset
        where = f" (node '{node}'" if node else " ("
        where += f", opset {opset})" if opset is not None else ")"
        if where == " ()":
            where = ""
        msg = f"unsupported operator {op_type}{where}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class ShapeError(CbirError, ValueError):
    """A tensor has the wrong rank or shape for where it is used."""


class DTypeError(CbirError, TypeError):
    """A tensor has a dtype the engine does not accept there."""


class NonFiniteError(CbirError, ValueError):
    """NaN or infinity where the caller asked for finite values (check_finite=True)."""


class IndexFileError(CbirError, ValueError):
    """An index file is truncated, corrupted, or of an unknown format or version."""


class PlanFileError(CbirError, ValueError):
    """A saved plan file is truncated, corrupted, or of an unknown format or version."""


class ImageDecodeError(CbirError, ValueError):
    """An image file or upload cannot be read or decoded (corrupt, truncated, not an image)."""


class IndexConsistencyError(IndexFileError):
    """An on-disk index whose metadata (SQLite) and code file disagree, or are missing a part."""


class IndexArgumentError(CbirError, ValueError):
    """An argument to an index call is out of range (k, radius, method, bits, ...)."""


class DuplicateIdError(IndexArgumentError):
    """`add` was given ids that repeat, or that the index already holds."""


class DeviceUnavailableError(CbirError, RuntimeError):
    """The index was asked to run on a device this machine does not have."""
