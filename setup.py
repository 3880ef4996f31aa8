"""Builds the compiled core `cbir_engine._C` (C++17, AVX2/FMA, threads; no CUDA needed)."""

import glob
import os

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

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
