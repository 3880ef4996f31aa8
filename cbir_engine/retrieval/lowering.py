"""Lowerings of the retrieval ops (fused NetVLAD and GeM, Sign) to their CPU kernels
(csrc/cpu/netvlad.cpp, registered in csrc/runtime/steps_retrieval.cpp)."""

from __future__ import annotations

import math

from cbir_engine.graph.ir import Node
from cbir_engine.plan.lower import Lowering, register_lowering


@register_lowering("NetVLAD")
def lower_netvlad(lw: Lowering, node: Node) -> None:
    x_shape = lw.shape(node.inputs[0])
    k, d = lw.shape(node.inputs[1])
    a = node.attrs
    n, hw = x_shape[0], math.prod(x_shape[2:])
    lw.emit(node, "netvlad", [int(a["normalize_input"])], [a["eps_in"], a["eps_intra"], a["eps_out"]],
            [lw.operand(node.inputs[0]), lw.operand(node.inputs[1]), lw.operand(node.input(2)),
             lw.operand(node.inputs[3]), lw.operand(node.outputs[0])],
            label=f"netvlad K={k} fused", flops=n * (4 * k * d * hw + 3 * d * hw))


@register_lowering("GeM")
def lower_gem(lw: Lowering, node: Node) -> None:
    a = node.attrs
    lw.emit(node, "gem", [], [a["p"], a["q"], a["eps"]],
            [lw.operand(node.inputs[0]), lw.operand(node.outputs[0])], label=f"gem p={a['p']:.3g} fused",
            flops=math.prod(lw.shape(node.inputs[0])) * 3)


@register_lowering("Sign")
def lower_sign(lw: Lowering, node: Node) -> None:
    lw.emit(node, "sign", [], [], [lw.operand(node.inputs[0]), lw.operand(node.outputs[0])], label="sign")
