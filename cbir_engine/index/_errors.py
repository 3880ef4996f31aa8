"""Old home of the index errors, which now live in `cbir_engine.errors`.

Only re-exports them (the same classes) for modules that still import from here; delete this file
once none does.
"""

from ..errors import DeviceUnavailableError, DuplicateIdError, IndexArgumentError

__all__ = ["IndexArgumentError", "DuplicateIdError", "DeviceUnavailableError"]
