"""setup.py's CUDA switch: the CUDA kernels are built only when asked for (CBIR_ENGINE_CUDA=1) or
when nvcc and a GPU are both found, never for CBIR_ENGINE_CUDA=0; and its source list is the one
the run-time builder uses. setup.py is read with ast (importing it would run setup())."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cbir_engine.gpu import cuda_lib

REPO = Path(__file__).resolve().parents[2]


def setup_namespace() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    keep = [
        n
        for n in tree.body
        if (isinstance(n, ast.FunctionDef) and n.name in ("find_nvcc", "cuda_wanted"))
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "CUDA_SOURCES" for t in n.targets))
    ]
    ns: dict = {"os": os, "shutil": shutil, "subprocess": subprocess}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def test_source_lists_agree():
    ns = setup_namespace()
    assert [REPO / p for p in ns["CUDA_SOURCES"]] == cuda_lib.SOURCES


@pytest.mark.parametrize(
    "flag, nvcc, smi_ok, want",
    [
        ("1", None, False, True),  # asked for: built (and fails loudly without nvcc)
        ("0", "/usr/bin/nvcc", True, False),
        ("", "/usr/bin/nvcc", True, True),
        ("", "/usr/bin/nvcc", False, False),  # nvcc but no GPU: the CPU-only CI
        ("", None, True, False),
    ],
)
def test_cuda_wanted(monkeypatch, flag, nvcc, smi_ok, want):
    ns = setup_namespace()
    monkeypatch.setenv("CBIR_ENGINE_CUDA", flag)
    ns["find_nvcc"] = lambda: nvcc

    class FakeShutil:
        @staticmethod
        def which(name):
            return "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None

    class FakeSubprocess:
        @staticmethod
        def run(cmd, **kw):
            return subprocess.CompletedProcess(
                cmd, 0 if smi_ok else 9, "GPU 0: NVIDIA H100" if smi_ok else "", ""
            )

    ns["shutil"], ns["subprocess"] = FakeShutil, FakeSubprocess
    assert ns["cuda_wanted"]() is want


def test_this_ci_machine_builds_no_cuda_part_by_default():
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU driver is installed here")
    ns = setup_namespace()
    env = os.environ.pop("CBIR_ENGINE_CUDA", None)
    try:
        assert ns["cuda_wanted"]() is False
    finally:
        if env is not None:
            os.environ["CBIR_ENGINE_CUDA"] = env
