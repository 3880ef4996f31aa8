"""The CUDA C++ op kernels (csrc/cuda: conv, depthwise, pooling, NetVLAD) and the Triton-cubin
launcher compile warning-free for sm_80 and sm_90 where nvcc exists, and their C entry points
check their arguments before any CUDA call (so this runs without a GPU)."""

from __future__ import annotations

import ctypes
import subprocess

import pytest

from cbir_engine.gpu import cuda_lib
from cbir_engine.index.cuda_backend import find_nvcc

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
NULL = ctypes.c_void_p(0)
FAKE = ctypes.c_void_p(0x1000)  # never dereferenced: the calls below fail before any CUDA work


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cuda_lib.load_library(cuda_lib.build_library("sm_90", tmp_path_factory.mktemp("cuda")))


def test_compiles_for_sm80_without_warnings(tmp_path):
    cmd = [NVCC, *cuda_lib.NVCC_FLAGS, "-arch=sm_80", f"-I{cuda_lib.CSRC}", "-c", *map(str, cuda_lib.SOURCES)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for src in cuda_lib.SOURCES:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def test_sm90_library_builds_and_exports_the_abi(lib):
    for name in (
        "cbir_conv2d_nhwc_cuda",
        "cbir_depthwise_nhwc_cuda",
        "cbir_pool_nhwc_cuda",
        "cbir_netvlad_nhwc_cuda",
        "cbir_triton_kernel_load",
        "cbir_triton_kernel_launch",
    ):
        assert hasattr(lib, name)


def test_conv_uses_tensor_core_instructions(tmp_path):
    out = tmp_path / "conv.ptx"
    cmd = [
        NVCC,
        "-std=c++17",
        "-O3",
        "-arch=sm_80",
        f"-I{cuda_lib.CSRC}",
        "-ptx",
        str(cuda_lib.CSRC / "cuda" / "conv.cu"),
        "-o",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = out.read_text()
    # fp16 operands are implied by the PTX form without operand types; bf16 names them.
    assert "wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32" in ptx
    assert "wmma.mma.sync.aligned.row.row.m16n16k16.f32.bf16.bf16.f32" in ptx


def conv_desc(**over) -> cuda_lib.ConvDesc:
    base = dict(
        n=1,
        h=8,
        w=8,
        c=16,
        k=32,
        kh=3,
        kw=3,
        oh=8,
        ow=8,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        groups=1,
        act=1,
        act_lo=0.0,
        act_hi=0.0,
    )
    base.update(over)
    return cuda_lib.ConvDesc(**base)


@pytest.mark.parametrize(
    "bad",
    [
        dict(n=0),
        dict(c=15, groups=2),
        dict(k=33, groups=2),
        dict(stride_h=0),
        dict(dil_w=0),
        dict(pad_h=-1),
        dict(act=7),
        dict(oh=100),
        dict(kh=0),
    ],
)
def test_conv_refuses_inconsistent_descriptors(lib, bad):
    d = conv_desc(**bad)
    assert (
        lib.cbir_conv2d_nhwc_cuda(ctypes.byref(d), 0, FAKE, FAKE, NULL, NULL, FAKE, NULL) == cuda_lib.EINVAL
    )


def test_conv_refuses_null_tensors_and_unknown_dtype(lib):
    d = conv_desc()
    assert (
        lib.cbir_conv2d_nhwc_cuda(ctypes.byref(d), 0, NULL, FAKE, NULL, NULL, FAKE, NULL) == cuda_lib.EINVAL
    )
    assert lib.cbir_conv2d_nhwc_cuda(None, 0, FAKE, FAKE, NULL, NULL, FAKE, NULL) == cuda_lib.EINVAL
    if not gpu_present():
        # A consistent call passes the checks and reaches CUDA, which has no device here.
        rc = lib.cbir_conv2d_nhwc_cuda(ctypes.byref(d), 0, FAKE, FAKE, NULL, NULL, FAKE, NULL)
        assert rc not in (0, cuda_lib.EINVAL)
    assert (
        lib.cbir_conv2d_nhwc_cuda(ctypes.byref(d), 9, FAKE, FAKE, NULL, NULL, FAKE, NULL) == cuda_lib.EINVAL
    )


def test_depthwise_needs_one_group_per_channel(lib):
    ok = conv_desc(k=16, groups=16)
    for bad in (conv_desc(k=16, groups=1), conv_desc(k=32, groups=16), conv_desc(k=16, groups=16, kw=0)):
        assert lib.cbir_depthwise_nhwc_cuda(ctypes.byref(bad), 0, FAKE, FAKE, NULL, NULL, FAKE, NULL) == -1
    if not gpu_present():
        assert lib.cbir_depthwise_nhwc_cuda(ctypes.byref(ok), 0, FAKE, FAKE, NULL, NULL, FAKE, NULL) not in (
            0,
            -1,
        )


def test_pool_checks(lib):
    base = dict(
        n=1,
        h=8,
        w=8,
        c=4,
        oh=4,
        ow=4,
        kh=2,
        kw=2,
        stride_h=2,
        stride_w=2,
        pad_top=0,
        pad_left=0,
        pad_bottom=0,
        pad_right=0,
        dil_h=1,
        dil_w=1,
        is_max=0,
        count_include_pad=0,
    )
    for bad in (dict(kh=0), dict(pad_right=-1), dict(dil_h=2)):  # average pooling has no dilation
        d = cuda_lib.PoolDesc(**{**base, **bad})
        assert lib.cbir_pool_nhwc_cuda(ctypes.byref(d), 0, FAKE, FAKE, NULL) == cuda_lib.EINVAL
    d = cuda_lib.PoolDesc(**{**base, "dil_h": 2, "is_max": 1})
    if not gpu_present():
        assert lib.cbir_pool_nhwc_cuda(ctypes.byref(d), 0, FAKE, FAKE, NULL) not in (0, cuda_lib.EINVAL)


def test_netvlad_workspace_and_checks(lib):
    d = cuda_lib.NetVLADDesc(
        n=2, hw=30, d=512, k=64, normalize_input=1, eps_in=1e-12, eps_intra=1e-12, eps_out=1e-12
    )
    ws = lib.cbir_netvlad_cuda_workspace(ctypes.byref(d))
    # assignments [n*hw, k], row scales [n*hw], V [n, k, d], fp32, each 256-byte aligned
    assert ws == sum(-(-4 * x // 256) * 256 for x in (2 * 30 * 64, 2 * 30, 2 * 64 * 512))
    args = (0, FAKE, FAKE, NULL, FAKE, FAKE, FAKE)
    assert lib.cbir_netvlad_nhwc_cuda(ctypes.byref(d), *args, ws - 1, NULL) == cuda_lib.EINVAL
    too_many = cuda_lib.NetVLADDesc(n=1, hw=4, d=8, k=257)
    assert lib.cbir_netvlad_cuda_workspace(ctypes.byref(too_many)) == 0
    assert lib.cbir_netvlad_nhwc_cuda(ctypes.byref(too_many), *args, 1 << 20, NULL) == cuda_lib.EINVAL


def test_triton_launcher_without_a_driver(lib):
    handle = ctypes.c_void_p()
    cubin = ctypes.create_string_buffer(b"\x7fELF" + b"\0" * 60)
    # Argument checks come first, then the scratch refusal, then the driver.
    assert lib.cbir_triton_kernel_load(NULL, 64, b"k", 4, 0, 0, 2, ctypes.byref(handle)) == cuda_lib.EINVAL
    assert lib.cbir_triton_kernel_load(cubin, 64, b"k", 0, 0, 0, 2, ctypes.byref(handle)) == cuda_lib.EINVAL
    assert lib.cbir_triton_kernel_load(cubin, 64, b"k", 4, 0, 0, 5, ctypes.byref(handle)) == cuda_lib.EINVAL
    assert (
        lib.cbir_triton_kernel_load(cubin, 64, b"k", 4, 0, 128, 2, ctypes.byref(handle))
        == cuda_lib.TRITON_ESCRATCH
    )
    assert lib.cbir_triton_kernel_launch(NULL, 1, 1, 1, None, 0, NULL) == cuda_lib.EINVAL
    assert b"scratch" in lib.cbir_triton_error_string(cuda_lib.TRITON_ESCRATCH)
    if not gpu_present():
        assert lib.cbir_triton_driver_status() == cuda_lib.TRITON_ENODRIVER
        assert (
            lib.cbir_triton_kernel_load(cubin, 64, b"k", 4, 0, 0, 2, ctypes.byref(handle))
            == cuda_lib.TRITON_ENODRIVER
        )
        assert b"libcuda" in lib.cbir_triton_error_string(cuda_lib.TRITON_ENODRIVER)
