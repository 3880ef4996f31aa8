"""Checks of the Triton op kernels against numpy/torch-CPU references, run by
test_triton_kernels.py in a child process with TRITON_INTERPRET=1 (the interpreter must be chosen
before triton is imported). `python tests/cpu/triton_checks.py FAMILY` prints 'ok FAMILY CASES'.

Inputs and weights are rounded to the kernel's dtype first and the reference is computed from the
rounded values in float64, so each tolerance measures the kernel's own error (fp32 accumulation,
rounding of the output and of fp16/bf16 intermediates), not the input's rounding.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

# Named tolerance tiers: max |got - ref| / max |ref|, per operand dtype.
TOLERANCE = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rounded(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(dt).to(torch.float64)


def nhwc(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous().to(dt)


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tier: str) -> None:
    ref = ref.to(torch.float64)
    err = (got.to(torch.float64) - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    if not np.isfinite(err) or err > TOLERANCE[tier]:
        raise AssertionError(f"{name} [{tier}]: relative error {err:.3g} > {TOLERANCE[tier]}")


def check_conv() -> int:
    from cbir_engine.kernels.common import ACT_CLIP, ACT_LEAKY, ACT_NONE, ACT_RELU, ACT_SIGMOID
    from cbir_engine.kernels.conv import conv2d_nhwc, pack_weights

    # (n, c, h, w, k, kernel, stride, pads, dilation, groups, residual, act)
    cases = [
        (1, 1, 7, 7, 1, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, ACT_NONE),
        (2, 7, 9, 8, 59, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, ACT_RELU),
        (1, 59, 5, 6, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, ACT_RELU),
        (1, 7, 7, 9, 17, (1, 7), (1, 1), (0, 3), (1, 1), 1, False, ACT_RELU),
        (1, 7, 9, 7, 17, (7, 1), (1, 1), (3, 0), (1, 1), 1, False, ACT_CLIP),
        (2, 3, 11, 11, 5, (7, 7), (2, 2), (3, 3), (1, 1), 1, False, ACT_LEAKY),
        (1, 8, 7, 7, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2, False, ACT_SIGMOID),
        (1, 33, 3, 4, 40, (2, 3), (1, 2), (0, 1), (1, 1), 1, True, ACT_NONE),
    ]
    torch.manual_seed(0)
    count = 0
    for tier, dt in DTYPES.items():
        for n, c, h, w, k, ks, st, pd, dl, g, res, act in cases:
            x = torch.randn(n, c, h, w)
            wt = torch.randn(k, c // g, *ks) / (c // g * ks[0] * ks[1]) ** 0.5
            b = torch.randn(k)
            ref = F.conv2d(rounded(x, dt), rounded(wt, dt), b.double(), st, pd, dl, g)
            r = torch.randn_like(ref) if res else None
            if r is not None:
                ref = ref + rounded(r, dt)
            lo, hi = (-0.5, 0.7) if act == ACT_CLIP else (0.1, 0.0)
            ref = {
                ACT_NONE: ref,
                ACT_RELU: ref.relu(),
                ACT_CLIP: ref.clamp(lo, hi),
                ACT_LEAKY: F.leaky_relu(ref, lo),
                ACT_SIGMOID: ref.sigmoid(),
            }[act]
            out = torch.full(ref.permute(0, 2, 3, 1).shape, float("nan"), dtype=dt)
            conv2d_nhwc(
                nhwc(x, dt),
                pack_weights(wt, g).to(dt),
                b,
                out=out,
                residual=nhwc(r, dt) if r is not None else None,
                stride=st,
                pads=pd,
                dilation=dl,
                groups=g,
                act=act,
                act_lo=lo,
                act_hi=hi,
            )
            check(
                f"conv {n}x{c}x{h}x{w} k{k} {ks} s{st} p{pd} d{dl} g{g}", out.permute(0, 3, 1, 2), ref, tier
            )
            count += 1
    return count


def check_depthwise() -> int:
    from cbir_engine.kernels.common import ACT_NONE, ACT_RELU
    from cbir_engine.kernels.depthwise import depthwise_nhwc, pack_weights

    cases = [  # (n, c, h, w, kernel, stride, pads, dilation, residual, act)
        (1, 1, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), False, ACT_RELU),
        (2, 59, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), True, ACT_NONE),
        (1, 7, 7, 9, (1, 7), (1, 1), (0, 3), (1, 1), False, ACT_RELU),
        (1, 7, 9, 7, (7, 1), (1, 1), (3, 0), (1, 1), True, ACT_RELU),
        (1, 130, 5, 5, (5, 5), (2, 2), (2, 2), (2, 2), False, ACT_NONE),
    ]
    torch.manual_seed(1)
    count = 0
    for tier, dt in DTYPES.items():
        for n, c, h, w, ks, st, pd, dl, res, act in cases:
            x = torch.randn(n, c, h, w)
            wt = torch.randn(c, 1, *ks)
            b = torch.randn(c)
            ref = F.conv2d(rounded(x, dt), rounded(wt, dt), b.double(), st, pd, dl, c)
            r = torch.randn_like(ref) if res else None
            if r is not None:
                ref = ref + rounded(r, dt)
            ref = ref.relu() if act == ACT_RELU else ref
            out = torch.full(ref.permute(0, 2, 3, 1).shape, float("nan"), dtype=dt)
            depthwise_nhwc(
                nhwc(x, dt),
                pack_weights(wt).to(dt),
                b,
                out=out,
                residual=nhwc(r, dt) if r is not None else None,
                stride=st,
                pads=pd,
                dilation=dl,
                act=act,
            )
            check(f"depthwise {n}x{c}x{h}x{w} {ks} s{st} p{pd} d{dl}", out.permute(0, 3, 1, 2), ref, tier)
            count += 1
    return count


def check_pool() -> int:
    from cbir_engine.kernels.pool import pool_nhwc

    cases = [  # (n, c, h, w, kernel, stride, pads (t, l, b, r), ceil_mode)
        (1, 1, 7, 7, (3, 3), (2, 2), (1, 1, 1, 1), False),
        (2, 59, 9, 8, (3, 3), (2, 2), (0, 0, 0, 0), True),
        (1, 7, 7, 9, (1, 7), (1, 1), (0, 3, 0, 3), False),
        (1, 7, 8, 8, (2, 2), (2, 2), (0, 0, 0, 0), False),
        (1, 3, 7, 7, (7, 7), (1, 1), (0, 0, 0, 0), False),
    ]
    torch.manual_seed(2)
    count = 0
    for tier, dt in DTYPES.items():
        for n, c, h, w, ks, st, pd, ceil in cases:
            x = torch.randn(n, c, h, w)
            xr = rounded(x, dt)
            sym = (pd[0], pd[1])
            for kind in ("max", "avg", "avg_pad"):
                if kind == "max":
                    ref = F.max_pool2d(xr, ks, st, sym, ceil_mode=ceil)
                else:
                    ref = F.avg_pool2d(xr, ks, st, sym, ceil_mode=ceil, count_include_pad=kind == "avg_pad")
                out = torch.full(ref.permute(0, 2, 3, 1).shape, float("nan"), dtype=dt)
                pool_nhwc(
                    nhwc(x, dt),
                    out=out,
                    kernel=ks,
                    stride=st,
                    pads=pd,
                    is_max=kind == "max",
                    count_include_pad=kind == "avg_pad",
                )
                check(
                    f"{kind} pool {n}x{c}x{h}x{w} {ks} s{st} p{pd} ceil={ceil}",
                    out.permute(0, 3, 1, 2),
                    ref,
                    tier,
                )
                count += 1
    return count


def check_netvlad() -> int:
    from cbir_engine.graph.passes.fuse_netvlad import netvlad_forward
    from cbir_engine.kernels.netvlad import netvlad_nhwc

    cases = [(1, 1, 1, 1, 1, True), (2, 7, 3, 5, 5, True), (1, 59, 1, 7, 17, False), (2, 40, 6, 7, 64, True)]
    rng = np.random.default_rng(3)
    count = 0
    for tier, dt in DTYPES.items():
        for n, d, h, w, k, norm in cases:
            x = torch.from_numpy(rng.standard_normal((n, d, h, w)).astype(np.float32))
            wk = torch.from_numpy(rng.standard_normal((k, d)).astype(np.float32))
            b = rng.standard_normal(k).astype(np.float32)
            c = rng.standard_normal((k, d)).astype(np.float32)
            ref = netvlad_forward(
                rounded(x, dt).numpy(),
                rounded(wk, dt).numpy(),
                b.astype(np.float64),
                c.astype(np.float64),
                norm,
                1e-12,
                1e-12,
                1e-12,
            )
            out = torch.full((n, k * d), float("nan"), dtype=dt)
            netvlad_nhwc(
                nhwc(x, dt),
                wk.T.contiguous().to(dt),
                torch.from_numpy(b),
                torch.from_numpy(c),
                out=out,
                normalize_input=norm,
                eps_in=1e-12,
                eps_intra=1e-12,
                eps_out=1e-12,
            )
            check(f"netvlad {n}x{d}x{h}x{w} K={k} norm={norm}", out, torch.from_numpy(ref), tier)
            count += 1
    return count


FAMILIES = {"conv": check_conv, "depthwise": check_depthwise, "pool": check_pool, "netvlad": check_netvlad}

if __name__ == "__main__":
    from cbir_engine.kernels.common import interpreting

    assert interpreting(), "run with TRITON_INTERPRET=1"
    family = sys.argv[1]
    print("ok", family, FAMILIES[family]())
