"""Importers for the ONNX operators retrieval heads add: Sign (the hashing layer at inference).
Importing this module also registers the lowerings of the fused retrieval ops."""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Node, Value
from cbir_engine.graph.ops import OPS, register_op
from cbir_engine.onnx.registry import Ctx, onnx_op


def _sign_infer(node: Node, ins: list[Value | None]) -> list:
    v = ins[0]
    return [(v.dtype, v.shape)]  # type: ignore[union-attr]


def _sign_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    return [np.sign(x).astype(x.dtype, copy=False)]


if "Sign" not in OPS:
    register_op("Sign", _sign_infer, _sign_eval)


@onnx_op("Sign", 9, 13)
def Sign(ctx: Ctx, x: str) -> None:
    ctx.emit("Sign", [x])


import cbir_engine.retrieval.lowering as _lowering  # noqa: E402,F401  (registers the lowerings)
