"""The graph IR: values, nodes and the graph that holds them.

A value's shape is a tuple whose entries are ints (known) or strings (symbols such as the batch
size). A value is either computed by a node, fed as a graph input, or constant (``const`` holds a
numpy array). Nodes are kept in a valid execution order; passes that rewire nodes call
``toposort`` when they may have broken it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Dim = int | str
Shape = tuple[Dim, ...]


@dataclass
class Value:
    name: str
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    shape: Shape | None = None  # None: not inferred yet
    const: np.ndarray | None = None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


@dataclass
class Node:
    op: str
    inputs: list[str]  # "" marks an absent optional input
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    # Where the node came from, for error messages: the ONNX node name and opset.
    origin: str = ""
    opset: int | None = None

    def input(self, i: int) -> str:
        return self.inputs[i] if i < len(self.inputs) else ""

    def describe(self) -> str:
        return f"{self.op} '{self.name or self.outputs[0]}'"


class Graph:
    def __init__(self) -> None:
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []  # value names; passes may rename them
        self.output_names: list[str] = []  # the names users see, fixed at import
        self._names = itertools.count()

    # ---- construction ----
    def value(self, name: str) -> Value:
        v = self.values.get(name)
        if v is None:
            v = self.values[name] = Value(name)
        return v

    def fresh_name(self, hint: str) -> str:
        while True:
            name = f"{hint}__{next(self._names)}"
            if name not in self.values:
                return name

    def add_const(self, array: np.ndarray, hint: str = "const") -> str:
        name = self.fresh_name(hint)
        arr = np.asarray(array)
        self.values[name] = Value(name, arr.dtype, tuple(int(d) for d in arr.shape), arr)
        return name

    def set_const(self, name: str, array: np.ndarray) -> None:
        arr = np.asarray(array)
        v = self.value(name)
        v.const, v.dtype, v.shape = arr, arr.dtype, tuple(int(d) for d in arr.shape)

    def add_node(
        self, op: str, inputs: list[str], outputs: list[str] | int = 1, **attrs: Any
    ) -> Node:
        if isinstance(outputs, int):
            outputs = [self.fresh_name(op.lower()) for _ in range(outputs)]
        node = Node(op, list(inputs), list(outputs), dict(attrs))
        for o in outputs:
            self.value(o)
        self.nodes.append(node)
        return node

    # ---- queries ----
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        v = self.values.get(name)
        return None if v is None else v.const

    def shape(self, name: str) -> Shape | None:
        return self.values[name].shape

    # ---- rewriting ----
    def replace_uses(self, old: str, new: str) -> None:
        """Points every consumer (and graph output) of `old` at `new`."""
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def remove_nodes(self, dead: Iterable[Node]) -> None:
        ids = {id(n) for n in dead}
        self.nodes = [n for n in self.nodes if id(n) not in ids]

    def toposort(self) -> None:
        """Reorders nodes so that each comes after the producers of its inputs (stable)."""
        produced = {o: n for n in self.nodes for o in n.outputs}
        order: list[Node] = []
        state: dict[int, int] = {}  # 1 visiting, 2 done

        def visit(n: Node) -> None:
            stack: list[tuple[Node, Iterator[str]]] = [(n, iter(n.inputs))]
            state[id(n)] = 1
            while stack:
                node, it = stack[-1]
                for i in it:
                    p = produced.get(i)
                    if p is None or state.get(id(p)) == 2:
                        continue
                    if state.get(id(p)) == 1:
                        raise ValueError(f"graph has a cycle through {p.describe()}")
                    state[id(p)] = 1
                    stack.append((p, iter(p.inputs)))
                    break
                else:
                    stack.pop()
                    state[id(node)] = 2
                    order.append(node)

        for n in self.nodes:
            if state.get(id(n)) != 2:
                visit(n)
        self.nodes = order

    def copy(self) -> Graph:
        """A structural copy; constant arrays are shared, not copied."""
        g = Graph()
        g.values = {k: Value(v.name, v.dtype, v.shape, v.const) for k, v in self.values.items()}
        g.nodes = [
            Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name, n.origin, n.opset)
            for n in self.nodes
        ]
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.output_names = list(self.output_names)
        g._names = itertools.count(next(self._names) + 1)
        return g

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, inputs={self.inputs}, outputs={self.outputs})"
