"""A Plan: the lowered steps of a graph specialised to concrete input shapes, with the arena
layout. Building the C++ executor from it is a single call."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cbir_engine.graph.ir import Graph
from cbir_engine.plan.lower import CONV_METHOD, Lowering, Operand, Packer, PlanStep
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
    # Values placed as channel slices of a concatenation's buffer at batch > 1: floats from one
    # image to the next (the buffer's per image), where the value's own would be smaller.
    batch_strides: dict[str, int]
    arena_bytes: int
    intermediate_bytes: int  # sum of every buffer's size, had each its own allocation

    def resolve(self, op: Operand | None) -> tuple | None:
        if op is None:
            return None
        if op.const is not None:
            return (True, op.const, list(op.shape))
        stride = self.batch_strides.get(op.value)  # type: ignore[arg-type]
        if stride:
            return (False, self.offsets[op.value], list(op.shape), stride)  # type: ignore[index]
        return (False, self.offsets[op.value], list(op.shape))  # type: ignore[index]

    def executor_args(self) -> tuple:
        steps = [(s.kernel, s.ints, s.floats, [self.resolve(o) for o in s.operands]) for s in self.steps]
        inputs = [(False, self.offsets[n], list(s))
                  for n, s in zip(self.input_names, self.input_shapes, strict=True)]
        outputs = [(False, o[0], list(o[1])) for o in self.outputs if not isinstance(o, np.ndarray)]
        return self.arena_bytes, list(self.constants), steps, inputs, outputs


def _takes_batch_stride(step: PlanStep, v: str) -> bool:
    """Whether `step` reads or writes `v` correctly as a channel slice of a larger tensor at batch
    > 1: conv steps other than depthwise, through their input x or their output y (not with a
    residual, whose layout follows y's), and pools through their output."""
    ops = step.operands
    uses = [i for i, op in enumerate(ops) if op is not None and op.value == v]
    if step.kernel in ("maxpool2d", "avgpool2d"):
        return uses == [1]
    if step.kernel != "conv2d" or step.ints[10] == CONV_METHOD["depthwise"]:
        return False
    if uses == [4]:
        return ops[3] is None
    return uses == [0]


Placement = tuple[dict[str, tuple[str, int]], set[str]]  # placed values -> (buffer, byte offset); slices


def place_concat_inputs(steps: list[PlanStep], protected: set[str]) -> Placement:
    """Lets producers write straight into a Concat's output instead of copying.

    At batch 1 (everything before the axis has size 1) each input is a contiguous slice of the
    output. At batch > 1, along axis 1 of a 4-D tensor, an input is a channel slice of every image:
    it is placed only where every step that writes or reads it takes a batch stride (conv steps,
    pools' outputs: `_takes_batch_stride`), and lives at the output's batch stride (see
    `Plan.batch_strides`).
    Concats are visited last to first: a concat places its inputs in its own buffer, and an
    earlier concat whose inputs already sit side by side in one buffer becomes a view of it
    (DenseNet's growing concatenations, Inception's nested ones). Returns, per placed value, the
    buffer it lives in and its byte offset there, and the placed values that are channel slices
    at batch > 1; copies that are no longer needed leave the concat steps, and steps left with
    nothing to copy are dropped from `steps`. Where a slice would end up read by a step that takes
    no batch stride (a concat that copies it), the buffer it would live in takes no slices.
    """
    no_slices: set[str] = set()  # concat outputs whose inputs are not placed as slices
    # Each round that finds a slice in the wrong place takes slices from one more buffer: it ends.
    while True:
        trial = [replace(s, operands=list(s.operands)) for s in steps]
        placed, strided = _place(trial, protected, no_slices)
        bad = {v for s in trial for v in _values_of(s) & strided if not _takes_batch_stride(s, v)}
        if not bad:
            steps[:] = trial
            return placed, strided
        for v in bad:
            while v in placed:
                v = placed[v][0]
            no_slices.add(v)


def _values_of(step: PlanStep) -> set[str]:
    return {op.value for op in step.operands if op is not None and op.value is not None} | set(step.outputs)


def _place(steps: list[PlanStep], protected: set[str], no_slices: set[str]) -> Placement:
    # Values written by a kernel step (a concat's own output is handled as a view or a buffer).
    produced = {o for s in steps if s.kernel != "concat" for o in s.outputs if o}
    users: dict[str, list[PlanStep]] = {}
    for s in steps:
        for v in _values_of(s):
            users.setdefault(v, []).append(s)
    placed: dict[str, tuple[str, int]] = {}
    strided: set[str] = set()

    def locate(v: str) -> tuple[str, int]:
        delta = 0
        while v in placed:
            v, d = placed[v]
            delta += d
        return v, delta

    def strided_ok(v: str, concat: PlanStep) -> bool:
        # Other concats that read v become views of the same buffer, or copy it (checked below).
        return all(s.kernel == "concat" or _takes_batch_stride(s, v)
                   for s in users.get(v, []) if s is not concat)

    dropped: set[int] = set()
    for idx in range(len(steps) - 1, -1, -1):
        step = steps[idx]
        if step.kernel != "concat":
            continue
        *ins, out = step.operands
        outer, chunks = step.ints[0], step.ints[1:]
        if outer != 1 and out.value in no_slices:  # type: ignore[union-attr]
            continue
        if outer != 1:
            # Channel slices of every image (axis 1 of a 4-D tensor): the chunks are whole
            # channels' planes, the outer index the image.
            shape = out.shape  # type: ignore[union-attr]
            if len(shape) != 4 or shape[0] != outer:
                continue
        values = [op.value if op is not None else None for op in ins]
        # A view when the inputs already sit side by side in one buffer.
        if all(v is not None and v in placed for v in values):
            locs = [locate(v) for v in values]  # type: ignore[arg-type]
            home, start = locs[0]
            if (all(h == home and o == start + 4 * sum(chunks[:j]) for j, (h, o) in enumerate(locs))
                    and (outer == 1 or strided_ok(out.value, step))):  # type: ignore[union-attr,arg-type]
                if out.value not in protected and out.value not in placed:  # type: ignore[union-attr]
                    placed[out.value] = (home, start)  # type: ignore[union-attr,index]
                    if outer != 1:
                        strided.add(out.value)  # type: ignore[union-attr,arg-type]
                    dropped.add(idx)
                    continue
        offset, copies = 0, []
        for op, v, chunk in zip(ins, values, chunks, strict=True):
            if (v is not None and v in produced and v not in protected and v not in placed
                    and v != out.value and values.count(v) == 1  # type: ignore[union-attr]
                    and (outer == 1 or strided_ok(v, step))):
                placed[v] = (out.value, offset * 4)  # type: ignore[union-attr]
                if outer != 1:
                    strided.add(v)
                copies.append(None)
            else:
                copies.append(op)
            offset += chunk
        step.operands = [*copies, out]
        if all(c is None for c in copies):
            dropped.add(idx)
    steps[:] = [s for i, s in enumerate(steps) if i not in dropped]
    return placed, strided


def build_plan(g: Graph, packer: Packer, packed_only: frozenset[str] = frozenset(),
               winograd: bool = True) -> Plan:
    """Lowers a specialised graph (every shape known) and plans its memory."""
    low = Lowering(g, packer, packed_only, winograd)
    low.run()
    protected = {low.root(n) for n in g.outputs if not g.values[n].is_const} | set(g.inputs)
    placed, strided = place_concat_inputs(low.steps, protected)
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
    batch_strides: dict[str, int] = {}
    for v in placed:
        home, delta = locate(v)
        offsets[v] = offsets[home] + delta
        if v in strided:  # a channel slice of every image: the home's floats per image apart
            batch_strides[v] = int(np.prod(g.values[home].shape[1:], dtype=np.int64))  # type: ignore[index]
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
        batch_strides=batch_strides,
        arena_bytes=arena,
        intermediate_bytes=sum(b.nbytes for b in buffers)
        + sum(int(np.prod(g.values[v].shape, dtype=np.int64)) * 4 for v in placed),  # type: ignore[arg-type]
    )
