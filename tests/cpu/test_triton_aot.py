"""Every Triton op kernel compiles ahead of time to an sm_90 cubin (no GPU needed), and the AOT
build writes the cubins with a manifest that matches what was compiled."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("triton")

from cbir_engine.kernels import aot  # noqa: E402
from cbir_engine.kernels.common import interpreting  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    out = tmp_path_factory.mktemp("cubins")
    variants = aot.default_variants(("fp16",)) + [
        aot.conv_variant("bf16", 3, 3),
        aot.conv_variant("fp32", 1, 1),
    ]
    return out, variants, aot.build(variants, out, arch=90)


def test_every_kernel_family_is_in_the_build(built):
    _, _, manifest = built
    kernels = {e["kernel"] for e in manifest["kernels"]}
    assert kernels == {
        "conv2d_nhwc_kernel",
        "depthwise_nhwc_kernel",
        "pool_nhwc_kernel",
        "netvlad_assign_kernel",
        "netvlad_aggregate_kernel",
        "netvlad_normalize_kernel",
    }


def test_cubins_exist_and_name_their_kernel(built):
    out, variants, manifest = built
    assert [e["key"] for e in manifest["kernels"]] == [v.key for v in variants]
    for entry in manifest["kernels"]:
        data = (out / entry["cubin"]).read_bytes()
        assert data[:4] == b"\x7fELF", entry["cubin"]
        assert entry["kernel"].encode() + b"\0" in data, entry[
            "cubin"
        ]  # the symbol cuModuleGetFunction asks for
        assert entry["arch"] == 90 and entry["num_warps"] in (4, 8) and entry["shared"] >= 0
        assert 1 <= entry["scratch_params"] <= 4  # Triton 3.8 appends global and profile scratch


def test_manifest_parameters_match_the_compiled_entry_point(built):
    """The manifest's parameter list (what the C++ launcher packs) has the PTX entry's arity and
    pointer/scalar kinds, scratch pointers included."""
    _, variants, manifest = built
    on_disk = json.loads((built[0] / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    for v, entry in zip(variants, manifest["kernels"], strict=True):
        ptx = aot.compile_variant(v).asm["ptx"]  # triton's cache holds it from the build
        params = re.search(r"\.entry\s+\w+\(([^)]*)\)", ptx, re.S).group(1)
        kinds = re.findall(r"\.param\s+\.(\w+)", params)
        assert len(kinds) == len(entry["params"])
        for kind, p in zip(kinds, entry["params"], strict=True):
            assert (kind == "u64") == p["type"].startswith("*"), (p, kind)


def test_conv_cubin_uses_hopper_tensor_cores():
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    compiled = aot.compile_variant(aot.conv_variant("fp16", 3, 3))
    assert "wgmma.mma_async" in compiled.asm["ptx"]  # not an FMA loop


def test_variant_rejects_unknown_constexpr():
    from cbir_engine.kernels.conv import conv2d_nhwc_kernel

    v = aot.Variant(key="bad", fn=conv2d_nhwc_kernel, constexprs={"NOT_A_PARAM": 1}, pointers={})
    with pytest.raises(ValueError, match="NOT_A_PARAM"):
        v.signature()


def test_cli_rejects_unknown_dtype(tmp_path, capsys):
    with pytest.raises(SystemExit):
        aot.main(["--out", str(tmp_path), "--dtypes", "fp8"])
    assert "unknown dtypes" in capsys.readouterr().err


def test_manifest_reads_back_and_packs_launch_arguments(built):
    import ctypes

    from cbir_engine.gpu.aot_launch import AotKernel, kernel_params, load_manifest, pack_args

    out, _, _ = built
    manifest = load_manifest(out)
    entry = next(e for e in manifest["kernels"] if e["kernel"] == "conv2d_nhwc_kernel")
    params = kernel_params(entry)
    assert [p["name"] for p in params[:5]] == ["x_ptr", "w_ptr", "bias_ptr", "res_ptr", "y_ptr"]
    args: list = [0x1000, 0x2000, 0x3000, None, 0x4000] + [3] * 15 + [0.5, 6.0]
    assert len(args) == len(params)
    packed = pack_args(entry, args)
    assert isinstance(packed[0], ctypes.c_void_p) and packed[0].value == 0x1000 and not packed[3].value
    assert isinstance(packed[5], ctypes.c_int32) and packed[5].value == 3
    assert isinstance(packed[-1], ctypes.c_float) and packed[-1].value == 6.0
    with pytest.raises(ValueError, match="takes 22 arguments"):
        pack_args(entry, args[:-1])
    with pytest.raises(TypeError, match="x_ptr is a pointer"):
        pack_args(entry, ["not a pointer", *args[1:]])
    with pytest.raises(TypeError, match="N is i32"):
        pack_args(entry, [*args[:5], 2.5, *args[6:]])
    # A cubin that no longer matches its manifest entry is refused before the driver sees it.
    tampered = dict(entry, sha256="0" * 64)
    with pytest.raises(ValueError, match="does not match"):
        AotKernel(None, tampered, out)


def test_manifest_version_is_checked(tmp_path):
    from cbir_engine.gpu.aot_launch import load_manifest

    (tmp_path / "manifest.json").write_text('{"version": 99, "kernels": []}')
    with pytest.raises(ValueError, match="version 99"):
        load_manifest(tmp_path)
