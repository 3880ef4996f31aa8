"""Each Triton and CUDA C++ op kernel (conv, depthwise, pooling, NetVLAD) on the GPU against torch
(fp32 references with TF32 off), and an AOT cubin launched through the driver-API launcher."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

# max |got - ref| / max |ref|, references computed from the dtype-rounded operands in fp32
TOLERANCE = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEV = "cuda"

CONV_CASES = [  # (n, c, h, w, k, kernel, stride, pads, dilation, groups, residual)
    (1, 3, 224, 224, 64, (7, 7), (2, 2), (3, 3), (1, 1), 1, False),
    (2, 64, 56, 56, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    (4, 256, 14, 14, 1024, (1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    (2, 7, 17, 17, 59, (1, 7), (1, 1), (0, 3), (1, 1), 1, False),
    (2, 59, 17, 17, 7, (7, 1), (1, 1), (3, 0), (1, 1), 1, False),
    (1, 128, 28, 28, 128, (3, 3), (2, 2), (1, 1), (1, 1), 32, False),
    (1, 33, 9, 9, 17, (3, 3), (1, 1), (2, 2), (2, 2), 1, True),
]


def cuda_lib():
    from cbir_engine.gpu import cuda_lib as cl
    from cbir_engine.index.cuda_backend import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    major, minor = torch.cuda.get_device_capability()
    return cl, cl.library(f"sm_{major}{minor}")


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def conv_problem(case, dt, seed=0):
    n, c, h, w, k, ks, st, pd, dl, g, res = case
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, c, h, w, device=DEV, generator=gen).to(dt)
    wt = (torch.randn(k, c // g, *ks, device=DEV, generator=gen) / (c // g * ks[0] * ks[1]) ** 0.5).to(dt)
    b = torch.randn(k, device=DEV, generator=gen)
    ref = F.conv2d(x.float(), wt.float(), b, st, pd, dl, g)
    r = torch.randn_like(ref).to(dt) if res else None
    if r is not None:
        ref = ref + r.float()
    return x, wt, b, r, ref.relu()


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", CONV_CASES)
def test_triton_conv(case, precision):
    from cbir_engine.kernels.conv import conv2d_nhwc, pack_weights

    dt = DTYPES[precision]
    x, wt, b, r, ref = conv_problem(case, dt)
    out = torch.empty(nhwc(ref).shape, dtype=dt, device=DEV)
    conv2d_nhwc(
        nhwc(x),
        pack_weights(wt, case[9]),
        b,
        out=out,
        residual=nhwc(r) if r is not None else None,
        stride=case[6],
        pads=case[7],
        dilation=case[8],
        groups=case[9],
        act=1,
    )
    assert rel(out.permute(0, 3, 1, 2), ref) <= TOLERANCE[precision]


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_conv(case, precision):
    from cbir_engine.kernels.conv import pack_weights

    cl, lib = cuda_lib()
    dt = DTYPES[precision]
    x, wt, b, r, ref = conv_problem(case, dt, seed=1)
    n, c, h, w, k, ks, st, pd, dl, g, _ = case
    out = torch.empty(nhwc(ref).shape, dtype=dt, device=DEV)
    d = cl.ConvDesc(
        n=n,
        h=h,
        w=w,
        c=c,
        k=k,
        kh=ks[0],
        kw=ks[1],
        oh=out.shape[1],
        ow=out.shape[2],
        stride_h=st[0],
        stride_w=st[1],
        pad_h=pd[0],
        pad_w=pd[1],
        dil_h=dl[0],
        dil_w=dl[1],
        groups=g,
        act=1,
    )
    xx, wp, rr = nhwc(x), pack_weights(wt, g), nhwc(r) if r is not None else None
    rc = lib.cbir_conv2d_nhwc_cuda(
        ctypes.byref(d),
        cl.DTYPE_CODES[precision],
        xx.data_ptr(),
        wp.data_ptr(),
        b.data_ptr(),
        rr.data_ptr() if rr is not None else None,
        out.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )
    assert rc == 0
    torch.cuda.synchronize()
    assert rel(out.permute(0, 3, 1, 2), ref) <= TOLERANCE[precision]


DW_CASES = [
    (2, 32, 112, 112, (3, 3), (1, 1), (1, 1)),
    (1, 59, 17, 17, (1, 7), (1, 1), (0, 3)),
    (2, 96, 28, 28, (5, 5), (2, 2), (2, 2)),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise(case, precision, backend):
    from cbir_engine.kernels.depthwise import depthwise_nhwc, pack_weights

    dt = DTYPES[precision]
    n, c, h, w, ks, st, pd = case
    x = torch.randn(n, c, h, w, device=DEV).to(dt)
    wt = torch.randn(c, 1, *ks, device=DEV).to(dt)
    b = torch.randn(c, device=DEV)
    ref = F.conv2d(x.float(), wt.float(), b, st, pd, 1, c).relu()
    out = torch.empty(nhwc(ref).shape, dtype=dt, device=DEV)
    if backend == "triton":
        depthwise_nhwc(nhwc(x), pack_weights(wt), b, out=out, stride=st, pads=pd, act=1)
    else:
        cl, lib = cuda_lib()
        d = cl.ConvDesc(
            n=n,
            h=h,
            w=w,
            c=c,
            k=c,
            kh=ks[0],
            kw=ks[1],
            oh=out.shape[1],
            ow=out.shape[2],
            stride_h=st[0],
            stride_w=st[1],
            pad_h=pd[0],
            pad_w=pd[1],
            dil_h=1,
            dil_w=1,
            groups=c,
            act=1,
        )
        xx, wp = nhwc(x), pack_weights(wt)
        rc = lib.cbir_depthwise_nhwc_cuda(
            ctypes.byref(d),
            cl.DTYPE_CODES[precision],
            xx.data_ptr(),
            wp.data_ptr(),
            b.data_ptr(),
            None,
            out.data_ptr(),
            torch.cuda.current_stream().cuda_stream,
        )
        assert rc == 0
    torch.cuda.synchronize()
    assert rel(out.permute(0, 3, 1, 2), ref) <= TOLERANCE[precision]


POOL_CASES = [  # (n, c, h, w, kernel, stride, pad, ceil, kind)
    (2, 64, 112, 112, (3, 3), (2, 2), (1, 1), False, "max"),
    (2, 59, 35, 35, (3, 3), (1, 1), (1, 1), False, "avg_pad"),
    (2, 59, 35, 35, (3, 3), (1, 1), (1, 1), False, "avg"),
    (1, 7, 17, 17, (3, 3), (2, 2), (0, 0), True, "max"),
    (2, 2048, 7, 7, (7, 7), (1, 1), (0, 0), False, "avg"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool(case, precision, backend):
    from cbir_engine.kernels.pool import pool_nhwc

    dt = DTYPES[precision]
    n, c, h, w, ks, st, pd, ceil, kind = case
    x = torch.randn(n, c, h, w, device=DEV).to(dt)
    if kind == "max":
        ref = F.max_pool2d(x.float(), ks, st, pd, ceil_mode=ceil)
    else:
        ref = F.avg_pool2d(x.float(), ks, st, pd, ceil_mode=ceil, count_include_pad=kind == "avg_pad")
    out = torch.empty(nhwc(ref).shape, dtype=dt, device=DEV)
    pads = (pd[0], pd[1], pd[0], pd[1])
    if backend == "triton":
        pool_nhwc(
            nhwc(x),
            out=out,
            kernel=ks,
            stride=st,
            pads=pads,
            is_max=kind == "max",
            count_include_pad=kind == "avg_pad",
        )
    else:
        cl, lib = cuda_lib()
        d = cl.PoolDesc(
            n=n,
            h=h,
            w=w,
            c=c,
            oh=out.shape[1],
            ow=out.shape[2],
            kh=ks[0],
            kw=ks[1],
            stride_h=st[0],
            stride_w=st[1],
            pad_top=pads[0],
            pad_left=pads[1],
            pad_bottom=pads[2],
            pad_right=pads[3],
            dil_h=1,
            dil_w=1,
            is_max=int(kind == "max"),
            count_include_pad=int(kind == "avg_pad"),
        )
        xx = nhwc(x)
        rc = lib.cbir_pool_nhwc_cuda(
            ctypes.byref(d),
            cl.DTYPE_CODES[precision],
            xx.data_ptr(),
            out.data_ptr(),
            torch.cuda.current_stream().cuda_stream,
        )
        assert rc == 0
    torch.cuda.synchronize()
    assert rel(out.permute(0, 3, 1, 2), ref) <= TOLERANCE[precision]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 512, 30, 40, 64, True), (3, 59, 7, 7, 17, False)])
def test_netvlad(shape, precision, backend):
    from cbir_engine.graph.passes.fuse_netvlad import netvlad_forward
    from cbir_engine.kernels.netvlad import netvlad_nhwc

    dt = DTYPES[precision]
    n, d, h, w, k, norm = shape
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, d, h, w)).astype(np.float32)).to(DEV, dt)
    wk = torch.from_numpy(rng.standard_normal((k, d)).astype(np.float32) * 0.1).to(DEV, dt)
    b = torch.from_numpy(rng.standard_normal(k).astype(np.float32)).to(DEV)
    c = torch.from_numpy(rng.standard_normal((k, d)).astype(np.float32)).to(DEV)
    ref = netvlad_forward(
        x.float().cpu().numpy(),
        wk.float().cpu().numpy(),
        b.cpu().numpy().astype(np.float64),
        c.cpu().numpy().astype(np.float64),
        norm,
        1e-12,
        1e-12,
        1e-12,
    )
    out = torch.empty((n, k * d), dtype=dt, device=DEV)
    xx, w_t = nhwc(x), wk.t().contiguous()
    if backend == "triton":
        netvlad_nhwc(
            xx, w_t, b, c, out=out, normalize_input=norm, eps_in=1e-12, eps_intra=1e-12, eps_out=1e-12
        )
    else:
        cl, lib = cuda_lib()
        desc = cl.NetVLADDesc(
            n=n, hw=h * w, d=d, k=k, normalize_input=int(norm), eps_in=1e-12, eps_intra=1e-12, eps_out=1e-12
        )
        ws_bytes = lib.cbir_netvlad_cuda_workspace(ctypes.byref(desc))
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=DEV)
        rc = lib.cbir_netvlad_nhwc_cuda(
            ctypes.byref(desc),
            cl.DTYPE_CODES[precision],
            xx.data_ptr(),
            w_t.data_ptr(),
            b.data_ptr(),
            c.data_ptr(),
            out.data_ptr(),
            ws.data_ptr(),
            ws_bytes,
            torch.cuda.current_stream().cuda_stream,
        )
        assert rc == 0
    torch.cuda.synchronize()
    assert rel(out.cpu(), torch.from_numpy(ref)) <= TOLERANCE[precision]


def test_aot_conv_cubin_through_driver_launcher(tmp_path):
    """The sm_XY cubin and manifest from the AOT build, launched with cuLaunchKernel, give what
    torch gives: the path the C++ executor will take."""
    from cbir_engine.gpu.aot_launch import AotKernel, load_manifest
    from cbir_engine.kernels import aot
    from cbir_engine.kernels.conv import pack_weights

    cl, lib = cuda_lib()
    major, minor = torch.cuda.get_device_capability()
    variant = aot.conv_variant("fp16", 3, 3, residual=False, act=1, block=(128, 64, 32))
    aot.build([variant], tmp_path, arch=major * 10 + minor)
    entry = load_manifest(tmp_path)["kernels"][0]
    torch.zeros(1, device=DEV)  # torch's context is current on this thread
    kernel = AotKernel(lib, entry, tmp_path)
    case = (2, 64, 28, 28, 96, (3, 3), (1, 1), (1, 1), (1, 1), 1, False)
    x, wt, b, _, ref = conv_problem(case, torch.float16)
    xx, wp = nhwc(x), pack_weights(wt, 1)
    out = torch.empty(nhwc(ref).shape, dtype=torch.float16, device=DEV)
    n, c, h, w, k = 2, 64, 28, 28, 96
    rows = n * h * w
    grid = (-(-rows // 128), -(-k // 64), 1)
    kernel.launch(
        grid,
        [xx, wp, b, out, out, n, h, w, c, h, w, k, c, k, 1, 1, 1, 1, 1, 1, 0.0, 0.0],
        torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    kernel.close()
    assert rel(out.permute(0, 3, 1, 2), ref) <= TOLERANCE["fp16"]
