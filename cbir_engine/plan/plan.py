"""A Plan: the lowered steps of a graph specialised to concrete input shapes, with the arena
layout. Building the C++ executor from it is a single call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir_engine.graph.ir import Graph
from cbir_engine.plan.lower import Lowering, Operand, Packer, PlanStep
from cbir_engine.plan.memory import Buffer, plan_offsets


@dataclass
class Plan:
    steps: list[PlanStep]
    constants: list[np.ndarray]
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    output_names: list[str]
    # Per output: the arena offset and shape, or a constant array (folded at plan time).
    outputs: list[tuple[int, tuple[int, ...]] | np.ndarray]
    offsets: dict[str, int]
    raw_constants: set[str]  # graph constants the kernels read unpacked
    arena_bytes: int
    intermediate_bytes: int  # sum of every buffer's size, had each its own allocation

    def resolve(self, op: Operand | None) -> tuple[bool, int, list[int]] | None:
        if op is None:
            return None
        if op.const is not None:
            return (True, op.const, list(op.shape))
        return (False, self.offsets[op.value], list(op.shape))  # type: ignore[index]

    def executor_args(self) -> tuple:
        steps = [(s.kernel, s.ints, s.floats, [self.resolve(o) for o in s.operands]) for s in self.steps]
        inputs = [(False, self.offsets[n], list(s))
                  for n, s in zip(self.input_names, self.input_shapes, strict=True)]
        outputs = [(False, o[0], list(o[1])) for o in self.outputs if not isinstance(o, np.ndarray)]
        return self.arena_bytes, list(self.constants), steps, inputs, outputs


def place_concat_inputs(steps: list[PlanStep], protected: set[str]) -> dict[str, tuple[str, int]]:
    """Lets producers write straight into a Concat's output instead of copying.

    Applies where each input is a contiguous slice of the output (everything before the axis has
    size 1, as at batch 1). Concats are visited last to first: a concat places its inputs in its
    own buffer, and an earlier concat whose inputs already sit side by side in one buffer becomes
    a view of it (DenseNet's growing concatenations, Inception's nested ones). Returns, per placed
    value, the buffer it lives in and its byte offset there; copies that are no longer needed
    leave the concat steps, and steps left with nothing to copy are dropped from `steps`.
    """
    # Values written by a kernel step (a concat's own output is handled as a view or a buffer).
    produced = {o for s in steps if s.kernel != "concat" for o in s.outputs if o}
    placed: dict[str, tuple[str, int]] = {}

    def locate(v: str) -> tuple[str, int]:
        delta = 0
        while v in placed:
            v, d = placed[v]
            delta += d
        return v, delta

    dropped: set[int] = set()
    for idx in range(len(steps) - 1, -1, -1):
        step = steps[idx]
        if step.kernel != "concat" or step.ints[0] != 1:
            continue
        *ins, out = step.operands
        chunks = step.ints[1:]
        values = [op.value if op is not None else None for op in ins]
        # A view when the inputs already sit side by side in one buffer.
        if all(v is not None and v in placed for v in values):
            locs = [locate(v) for v in values]  # type: ignore[arg-type]
            home, start = locs[0]
            if all(h == home and o == start + 4 * sum(chunks[:j]) for j, (h, o) in enumerate(locs)):
                if out.value not in protected and out.value not in placed:  # type: ignore[union-attr]
                    placed[out.value] = (home, start)  # type: ignore[union-attr,index]
                    dropped.add(idx)
                    continue
        offset, copies = 0, []
        for op, v, chunk in zip(ins, values, chunks, strict=True):
            if (v is not None and v in produced and v not in protected and v not in placed
                    and v != out.value and values.count(v) == 1):  # type: ignore[union-attr]
                placed[v] = (out.value, offset * 4)  # type: ignore[union-attr]
                copies.append(None)
            else:
                copies.append(op)
            offset += chunk
        step.operands = [*copies, out]
        if all(c is None for c in copies):
            dropped.add(idx)
    steps[:] = [s for i, s in enumerate(steps) if i not in dropped]
    return placed


def build_plan(g: Graph, packer: Packer, packed_only: frozenset[str] = frozenset(),
               winograd: bool = True) -> Plan:
    """Lowers a specialised graph (every shape known) and plans its memory."""
    low = Lowering(g, packer, packed_only, winograd)
    low.run()
    protected = {low.root(n) for n in g.outputs if not g.values[n].is_const} | set(g.inputs)
    placed = place_concat_inputs(low.steps, protected)
    n_steps = len(low.steps)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for name in g.inputs:
        first[name] = last[name] = -1
    for i, step in enumerate(low.steps):
        for op in step.operands:
            if op is not None and op.value is not None:
                first.setdefault(op.value, i)
                last[op.value] = i
        for out in step.outputs:  # outputs written but never read still need room
            if out and not g.values[out].is_const:
                r = low.root(out)
                first.setdefault(r, i)
                last[r] = max(last.get(r, i), i)
    outputs: list[tuple[str, np.ndarray | None]] = []
    for name in g.outputs:
        v = g.values[name]
        if v.is_const:
            outputs.append((name, v.const))
            continue
        r = low.root(name)
        first.setdefault(r, -1)
        last[r] = n_steps
        outputs.append((r, None))
    def locate(v: str) -> tuple[str, int]:
        delta = 0
        while v in placed:
            v, d = placed[v]
            delta += d
        return v, delta

    # A placed value's steps count for the buffer it lives in.
    for v in placed:
        if v in first:
            home, _ = locate(v)
            first[home] = min(first.get(home, first[v]), first[v])
            last[home] = max(last.get(home, last[v]), last[v])
            del first[v], last[v]
    buffers = []
    for name, f in first.items():
        shape = g.values[name].shape
        nbytes = int(np.prod(shape, dtype=np.int64)) * g.values[name].dtype.itemsize  # type: ignore[arg-type]
        buffers.append(Buffer(name, nbytes, f, last[name]))
    offsets, arena = plan_offsets(buffers)
    for v in placed:
        home, delta = locate(v)
        offsets[v] = offsets[home] + delta
    out_refs: list[tuple[int, tuple[int, ...]] | np.ndarray] = []
    for (root, const), name in zip(outputs, g.outputs, strict=True):
        if const is not None:
            out_refs.append(np.array(const))
        else:
            out_refs.append((offsets[root], tuple(int(d) for d in g.values[name].shape)))  # type: ignore[union-attr]
    return Plan(
        steps=low.steps,
        constants=low.constants,
        input_names=list(g.inputs),
        input_shapes=[tuple(int(d) for d in g.values[n].shape) for n in g.inputs],  # type: ignore[union-attr]
        output_names=list(g.output_names),
        outputs=out_refs,
        offsets=offsets,
        raw_constants=low.raw_constants,
        arena_bytes=arena,
        intermediate_bytes=sum(b.nbytes for b in buffers)
        + sum(int(np.prod(g.values[v].shape, dtype=np.int64)) * 4 for v in placed),  # type: ignore[arg-type]
    )
