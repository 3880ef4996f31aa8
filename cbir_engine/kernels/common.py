"""Pieces the Triton op kernels share: the fused activation epilogue, the activation codes (the
same numbering as the CPU plan's `ACT`), dtype names and the interpreter switch."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Activation codes of the fused epilogue (cbir_engine.plan.lower.ACT uses the same numbers).
ACT_NONE, ACT_RELU, ACT_CLIP, ACT_LEAKY, ACT_SIGMOID = 0, 1, 2, 3, 4

# Triton pointer types for the operand dtypes the GPU path runs.
POINTER_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set: kernels then run on the CPU on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def apply_activation(v, lo, hi, ACT: tl.constexpr):
    """v (fp32) through the fused activation; lo/hi are Clip's bounds, lo is LeakyRelu's alpha."""
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, lo), hi)
    elif ACT == 3:
        v = tl.where(v >= 0.0, v, v * lo)
    elif ACT == 4:
        v = 1.0 / (1.0 + tl.exp(-v))
    return v


def ieee_dot(dtype: object) -> bool:
    """Whether a kernel should multiply in fp32 (IEEE, no TF32): fp32 operands, and bf16 under the
    interpreter, whose tl.dot misreads bf16 tiles."""
    name = str(dtype).replace("torch.", "")
    return name == "float32" or (name == "bfloat16" and interpreting())
