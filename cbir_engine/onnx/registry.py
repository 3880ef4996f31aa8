"""Registry of ONNX operator importers, keyed by operator name and schema version.

An importer is a function named as the op. Its positional parameters are the node's inputs (value
names, None when absent) and its keyword-only parameters are the node's attributes, typed. It
records IR nodes through the ``Ctx`` it receives. A function lists the schema versions it was
written against (``since_version`` values of the ONNX operator); a model whose opset resolves to
any other version of the op is refused with UnsupportedOpError naming the version.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbir_engine.errors import UnsupportedOpError
from cbir_engine.graph.ir import Graph, Node


@dataclass(frozen=True)
class OnnxOp:
    name: str
    versions: tuple[int, ...]
    fn: Callable[..., None]
    attrs: frozenset[str]
    fold_only: bool  # consumed by constant folding, never run by a kernel


REGISTRY: dict[str, OnnxOp] = {}


def onnx_op(name: str, *versions: int, fold_only: bool = False) -> Callable:
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(fn)
        attrs = frozenset(
            p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        REGISTRY[name] = OnnxOp(name, tuple(sorted(versions)), fn, attrs, fold_only)
        return fn

    return deco


def schema_version(op_type: str, opset: int) -> int | None:
    import onnx.defs

    try:
        return int(onnx.defs.get_schema(op_type, opset, "").since_version)
    except Exception:  # unknown op, or no version at this opset
        return None


def resolve(op_type: str, opset: int, node_name: str) -> OnnxOp:
    op = REGISTRY.get(op_type)
    if op is None:
        raise UnsupportedOpError(op_type, node_name, opset)
    version = schema_version(op_type, opset)
    if version is None or version not in op.versions:
        raise UnsupportedOpError(
            op_type, node_name, opset,
            f"opset {opset} selects version {version} of {op_type}; supported versions: "
            f"{', '.join(map(str, op.versions))}",
        )
    return op


class Ctx:
    """What an importer function sees of the graph being built."""

    def __init__(self, graph: Graph, op_type: str, name: str, opset: int, outputs: list[str]):
        self.graph = graph
        self.op_type = op_type
        self.name = name
        self.opset = opset
        self.outputs = outputs

    def emit(self, op: str, inputs: list[str | None], outputs: list[str] | None = None,
             **attrs: Any) -> list[str]:
        outs = list(outputs) if outputs is not None else list(self.outputs)
        node = Node(op, [i or "" for i in inputs], outs, attrs, name=self.name,
                    origin=self.name, opset=self.opset)
        for o in outs:
            self.graph.value(o)
        self.graph.nodes.append(node)
        return outs

    def tmp(self, hint: str = "t") -> str:
        name = self.graph.fresh_name(f"{self.name or self.op_type}_{hint}")
        self.graph.value(name)
        return name

    def const(self, name: str | None) -> np.ndarray | None:
        return self.graph.const(name) if name else None

    def add_const(self, array: np.ndarray) -> str:
        return self.graph.add_const(array, f"{self.name or self.op_type}_c")

    def require_const(self, name: str | None, what: str) -> np.ndarray:
        c = self.const(name)
        if c is None:
            self.fail(f"{what} must be a constant")
        return c  # type: ignore[return-value]

    def alias(self, src: str, dst: str) -> None:
        """Makes `dst` the same value as `src` (an Identity the passes remove)."""
        self.emit("Identity", [src], [dst])

    def fail(self, detail: str) -> None:
        raise UnsupportedOpError(self.op_type, self.name, self.opset, detail)
