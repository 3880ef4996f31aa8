"""Helpers shared by the product tests."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cbir ARGS` in a child process (what a person types), output captured."""
    proc = subprocess.run([sys.executable, "-m", "cbir_engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cbir {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def corrupt_files(folder) -> tuple:  # type: ignore[no-untyped-def]
    """Adds a truncated JPEG and a text file named .jpg to `folder`; returns their paths."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    truncated = folder / "broken.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    text = folder / "notes.jpg"
    text.write_text("this is a text file with an image's name\n")
    return truncated, text
