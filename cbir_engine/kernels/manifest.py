"""The AOT manifest's format constants, importable without triton (the run-time launcher needs
them; the build in aot.py writes them)."""

from __future__ import annotations

MANIFEST_VERSION = 1
# Triton appends these pointer parameters after the kernel's own (global and profile scratch).
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")
