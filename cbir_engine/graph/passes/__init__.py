"""Graph rewrites. Each is a small function `pass(graph) -> changed`; `optimize` runs the
simplifications until nothing changes, then the fusions until nothing changes."""

from __future__ import annotations

from collections.abc import Callable

from cbir_engine.graph.ir import Graph
from cbir_engine.graph.passes.dead_nodes import remove_dead_nodes
from cbir_engine.graph.passes.decompose_batchnorm import decompose_batchnorm
from cbir_engine.graph.passes.fold_batchnorm import fold_batchnorm
from cbir_engine.graph.passes.fuse_activation import fuse_activation
from cbir_engine.graph.passes.fuse_gem import fuse_gem
from cbir_engine.graph.passes.fuse_input_affine import fuse_input_affine
from cbir_engine.graph.passes.fuse_netvlad import fuse_netvlad
from cbir_engine.graph.passes.fuse_pad import fuse_pad_into_conv
from cbir_engine.graph.passes.fuse_residual import fuse_residual, fuse_residual_eltwise
from cbir_engine.graph.passes.matmul_to_gemm import matmul_add_to_gemm
from cbir_engine.graph.passes.pool_before_pointwise import pool_before_pointwise_conv
from cbir_engine.graph.passes.propagate import propagate
from cbir_engine.graph.passes.remove_identity import remove_identity

Pass = Callable[[Graph], bool]

SIMPLIFY: list[Pass] = [propagate, remove_identity, remove_dead_nodes, fold_batchnorm,
                        pool_before_pointwise_conv]
# The head fusions run first: fuse_activation would otherwise take GeM's Clip into the trunk's last conv.
FUSE: list[Pass] = [fuse_netvlad, fuse_gem, fuse_pad_into_conv, matmul_add_to_gemm, fuse_residual,
                    fuse_residual_eltwise, fuse_activation, fuse_input_affine]


def run_to_fixpoint(g: Graph, passes: list[Pass], limit: int = 50) -> None:
    for _ in range(limit):
        changed = False
        for p in passes:
            changed |= p(g)
        if not changed:
            return
    raise RuntimeError("graph passes did not converge")


def optimize(g: Graph, *, fuse: bool = True) -> Graph:
    """Simplifies then fuses `g` in place; returns it."""
    g.toposort()
    run_to_fixpoint(g, SIMPLIFY)
    if fuse:
        run_to_fixpoint(g, FUSE + [propagate, remove_dead_nodes])
    return g


__all__ = [
    "optimize", "run_to_fixpoint", "propagate", "remove_identity", "remove_dead_nodes",
    "fold_batchnorm", "fuse_activation", "fuse_residual", "fuse_pad_into_conv",
    "matmul_add_to_gemm", "decompose_batchnorm", "fuse_input_affine", "fuse_residual_eltwise",
    "pool_before_pointwise_conv",
]
