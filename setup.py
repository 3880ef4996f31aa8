"""Builds the compiled core `cbir_engine._C` (C++17, AVX2/FMA, threads; no CUDA needed).

The CUDA kernels (csrc/cuda) are built too, into cbir_engine/libcbir_cuda.so, only when
CBIR_ENGINE_CUDA=1, or when CBIR_ENGINE_CUDA is unset and both nvcc and an NVIDIA GPU are found.
CBIR_ENGINE_CUDA=0 never builds them; CBIR_ENGINE_CUDA_ARCHS picks the architectures ("80,90").
"""

import glob
import os
import shutil
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("CBIR_BUILD_JOBS", default=0).install()

sources = sorted(
    glob.glob("csrc/bindings.cpp")
    + glob.glob("csrc/runtime/*.cpp")
    + glob.glob("csrc/cpu/*.cpp")
)

debug = os.environ.get("CBIR_ENGINE_DEBUG") == "1"
extra_compile_args = ["-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-pthread", "-fvisibility=hidden"]
extra_compile_args += ["-O0", "-g"] if debug else ["-O3"]

ext = Pybind11Extension(
    "cbir_engine._C",
    sources,
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-pthread"],
)

# Same list as cbir_engine/gpu/cuda_lib.py SOURCES (a test checks they agree).
CUDA_SOURCES = ["csrc/cuda/conv.cu", "csrc/cuda/depthwise.cu", "csrc/cuda/pool.cu", "csrc/cuda/netvlad.cu",
                "csrc/cuda/triton_launcher.cpp"]


def find_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def cuda_wanted():
    flag = os.environ.get("CBIR_ENGINE_CUDA", "")
    if flag in ("0", "1"):
        return flag == "1"
    if find_nvcc() is None or shutil.which("nvidia-smi") is None:
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return probe.returncode == 0 and "GPU" in probe.stdout


class build_ext_cuda(build_ext):
    """build_ext, plus the CUDA kernels as a plain shared library when cuda_wanted()."""

    def run(self):
        super().run()
        if not cuda_wanted():
            return
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("CBIR_ENGINE_CUDA=1 but nvcc was not found")
        archs = os.environ.get("CBIR_ENGINE_CUDA_ARCHS", "80,90").split(",")
        out_dir = "cbir_engine" if self.inplace else os.path.join(self.build_lib, "cbir_engine")
        os.makedirs(out_dir, exist_ok=True)
        cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-Icsrc", *CUDA_SOURCES, "-ldl",
               "-o", os.path.join(out_dir, "libcbir_cuda.so")]
        for a in archs:
            cmd[1:1] = ["-gencode", f"arch=compute_{a.strip()},code=sm_{a.strip()}"]
        print("building the CUDA kernels:", " ".join(cmd))
        subprocess.run(cmd, check=True)


setup(ext_modules=[ext], cmdclass={"build_ext": build_ext_cuda})
