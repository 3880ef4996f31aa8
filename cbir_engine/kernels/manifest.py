"""The AOT manifest's format constants, importable without triton (the run-time launcher needs
them; the build in aot.py writes them)."""

from __future__ import annotations

MANIFEST_VERSION = 2
# Triton appends pointer parameters after the kernel's own (global scratch, and profile scratch in
# newer versions); the manifest names them scratch0, scratch1, ... and gives their count, read off
# the compiled entry point, so the launcher passes as many null pointers.
SCRATCH_PREFIX = "scratch"
MAX_SCRATCH_PARAMS = 4
