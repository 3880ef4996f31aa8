"""Ahead-of-time compile of the Triton kernels to cubins, with a JSON manifest for the C++ side.

Each variant fixes a kernel's constexprs (tile shape, kernel size, epilogue, dtype) and is
compiled for one GPU architecture without a GPU (`triton.compile` with a `GPUTarget`). The
manifest gives, per cubin, what a driver-API launch needs (csrc/cuda/triton_launcher.h): the
kernel's symbol, its run-time parameters in order (constexprs are compiled in and take no slot),
the scratch pointers Triton appends (their count; pass null when their sizes are 0), num_warps
(blockDim.x = 32 * num_warps) and the dynamic shared memory in bytes.

    python -m cbir_engine.kernels.aot --out build/cubins --arch 90
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cbir_engine.fileio import atomic_write
from cbir_engine.kernels import conv, depthwise, netvlad, pool
from cbir_engine.kernels.common import POINTER_TYPES
from cbir_engine.kernels.manifest import MANIFEST_VERSION, MAX_SCRATCH_PARAMS, SCRATCH_PREFIX


@dataclass
class Variant:
    """One kernel specialised for compilation: `pointers` maps pointer params to Triton types
    ('*fp16', ...); `floats` names the fp32 scalars; every other non-constexpr param is i32."""

    key: str
    fn: Any
    constexprs: dict[str, int | bool]
    pointers: dict[str, str]
    floats: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    options: dict[str, Any] = field(default_factory=dict)

    def signature(self) -> dict[str, str]:
        sig: dict[str, str] = {}
        for name in self.fn.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = self.pointers[name]
            elif name in self.floats:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        missing = set(self.constexprs) - set(sig)
        if missing:
            raise ValueError(
                f"{self.key}: constexprs {sorted(missing)} are not parameters of {self.fn.__name__}"
            )
        return sig


def conv_variant(
    dtype: str,
    kh: int,
    kw: int,
    *,
    bias: bool = True,
    residual: bool = False,
    act: int = 1,
    block: tuple[int, int, int] = (128, 64, 32),
    num_warps: int = 4,
) -> Variant:
    p = POINTER_TYPES[dtype]
    bm, bn, bk = block
    return Variant(
        key=f"conv_{dtype}_{kh}x{kw}_b{int(bias)}r{int(residual)}a{act}_{bm}x{bn}x{bk}",
        fn=conv.conv2d_nhwc_kernel,
        constexprs=dict(
            KH=kh,
            KW=kw,
            HAS_BIAS=bias,
            HAS_RES=residual,
            ACT=act,
            IEEE=dtype == "fp32",
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
        ),
        pointers=dict(x_ptr=p, w_ptr=p, bias_ptr="*fp32", res_ptr=p, y_ptr=p),
        floats=("act_lo", "act_hi"),
        num_warps=num_warps,
    )


def depthwise_variant(
    dtype: str, kh: int, kw: int, *, act: int = 1, block: tuple[int, int] = (32, 128)
) -> Variant:
    p = POINTER_TYPES[dtype]
    return Variant(
        key=f"depthwise_{dtype}_{kh}x{kw}_a{act}_{block[0]}x{block[1]}",
        fn=depthwise.depthwise_nhwc_kernel,
        constexprs=dict(
            KH=kh, KW=kw, HAS_BIAS=True, HAS_RES=False, ACT=act, BLOCK_P=block[0], BLOCK_C=block[1]
        ),
        pointers=dict(x_ptr=p, w_ptr=p, bias_ptr="*fp32", res_ptr=p, y_ptr=p),
        floats=("act_lo", "act_hi"),
    )


def pool_variant(
    dtype: str, kh: int, kw: int, *, is_max: bool, count_pad: bool = False, block: tuple[int, int] = (32, 128)
) -> Variant:
    p = POINTER_TYPES[dtype]
    kind = "max" if is_max else f"avg{'_pad' if count_pad else ''}"
    return Variant(
        key=f"pool_{kind}_{dtype}_{kh}x{kw}_{block[0]}x{block[1]}",
        fn=pool.pool_nhwc_kernel,
        constexprs=dict(KH=kh, KW=kw, IS_MAX=is_max, COUNT_PAD=count_pad, BLOCK_P=block[0], BLOCK_C=block[1]),
        pointers=dict(x_ptr=p, y_ptr=p),
    )


def netvlad_variants(dtype: str, k: int, *, normalize: bool = True) -> list[Variant]:
    p = POINTER_TYPES[dtype]
    bk = netvlad.block_k(k)
    ieee = dtype == "fp32"
    f32 = "*fp32"
    return [
        Variant(
            key=f"netvlad_assign_{dtype}_k{bk}",
            fn=netvlad.netvlad_assign_kernel,
            constexprs=dict(
                NORMALIZE=normalize, HAS_BIAS=True, IEEE=ieee, BLOCK_I=32, BLOCK_D=32, BLOCK_K=bk
            ),
            pointers=dict(x_ptr=p, w_ptr=p, b_ptr=f32, a_ptr=f32, inv_ptr=f32),
            floats=("eps_in",),
        ),
        Variant(
            key=f"netvlad_aggregate_{dtype}_k{bk}",
            fn=netvlad.netvlad_aggregate_kernel,
            constexprs=dict(BLOCK_I=32, BLOCK_D=32, BLOCK_K=bk),
            pointers=dict(x_ptr=p, a_ptr=f32, inv_ptr=f32, c_ptr=f32, v_ptr=f32),
        ),
        Variant(
            key=f"netvlad_normalize_{dtype}_k{bk}",
            fn=netvlad.netvlad_normalize_kernel,
            constexprs=dict(BLOCK_D=32, BLOCK_K=bk),
            pointers=dict(v_ptr=f32, y_ptr=p),
            floats=("eps_intra", "eps_out"),
        ),
    ]


def default_variants(dtypes: Iterable[str] = ("fp16",)) -> list[Variant]:
    """One variant of every kernel family per dtype: what CI compiles, and a seed set for a plan."""
    out: list[Variant] = []
    for dt in dtypes:
        out += [
            conv_variant(dt, 3, 3),
            conv_variant(dt, 1, 1, residual=True),
            conv_variant(dt, 1, 7),
            depthwise_variant(dt, 3, 3),
            pool_variant(dt, 3, 3, is_max=True),
            pool_variant(dt, 3, 3, is_max=False, count_pad=True),
            *netvlad_variants(dt, 64),
        ]
    return out


def compile_variant(v: Variant, arch: int = 90) -> Any:
    """The triton CompiledKernel of `v` for sm_<arch> (no GPU needed)."""
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages, **v.options}
    return triton.compile(
        ASTSource(fn=v.fn, signature=v.signature(), constexprs=v.constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )


def manifest_entry(v: Variant, compiled: Any, cubin_name: str, arch: int) -> dict[str, Any]:
    md = compiled.metadata
    sig = v.signature()
    params = [{"name": n, "type": t} for n, t in sig.items() if t != "constexpr"]
    scratch = entry_param_count(compiled.asm["ptx"], md.name) - len(params)
    if not 0 <= scratch <= MAX_SCRATCH_PARAMS:
        raise ValueError(f"{v.key}: the compiled entry has {scratch} parameters beyond the kernel's own")
    params += [{"name": f"{SCRATCH_PREFIX}{i}", "type": "*i8"} for i in range(scratch)]
    cubin = compiled.asm["cubin"]
    return {
        "key": v.key,
        "kernel": md.name,
        "cubin": cubin_name,
        "sha256": hashlib.sha256(cubin).hexdigest(),
        "arch": arch,
        "params": params,
        "constexprs": {k: (int(x) if isinstance(x, bool) else x) for k, x in v.constexprs.items()},
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "shared": md.shared,
        "scratch_params": scratch,
        # Older Triton versions lack these fields: their kernels use no such scratch.
        "global_scratch_size": getattr(md, "global_scratch_size", 0) or 0,
        "profile_scratch_size": getattr(md, "profile_scratch_size", 0) or 0,
    }


def entry_param_count(ptx: str, name: str) -> int:
    """How many parameters the PTX entry point `name` takes."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return len(re.findall(r"\.param\s", m.group(1)))


def build(variants: Iterable[Variant], out_dir: str | Path, arch: int = 90) -> dict[str, Any]:
    """Compiles every variant, writes <key>.cubin files and manifest.json (atomically) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    seen: set[str] = set()
    for v in variants:
        if v.key in seen:
            raise ValueError(f"two variants share the key {v.key}")
        seen.add(v.key)
        compiled = compile_variant(v, arch)
        name = f"{v.key}.sm{arch}.cubin"
        atomic_write(out / name, [compiled.asm["cubin"]])
        entries.append(manifest_entry(v, compiled, name, arch))
    manifest = {"version": MANIFEST_VERSION, "triton": triton.__version__, "arch": arch, "kernels": entries}
    atomic_write(out / "manifest.json", [json.dumps(manifest, indent=1).encode()])
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the cubins and manifest.json")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (80, 90, ...)")
    ap.add_argument("--dtypes", default="fp16", help="comma-separated: fp16,bf16,fp32")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in POINTER_TYPES]
    if bad:
        ap.error(f"unknown dtypes {bad}; choose from {sorted(POINTER_TYPES)}")
    manifest = build(default_variants(dtypes), args.out, args.arch)
    for e in manifest["kernels"]:
        print(
            f"{e['cubin']}: {e['kernel']}, {len(e['params'])} params, {e['num_warps']} warps, "
            f"{e['shared']} B shared"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
