"""The Triton op kernels (conv, depthwise, pooling, NetVLAD) against their references under the
Triton interpreter, each family in a child process (TRITON_INTERPRET must be set before triton
is imported, and other tests import it first). The cases live in triton_checks.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
EXPECTED_CASES = {"conv": 24, "depthwise": 15, "pool": 45, "netvlad": 12}


@pytest.mark.parametrize("family", sorted(EXPECTED_CASES))
def test_kernel_family_matches_reference_in_interpreter(family):
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cpu" / "triton_checks.py"), family],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split() == ["ok", family, str(EXPECTED_CASES[family])]
