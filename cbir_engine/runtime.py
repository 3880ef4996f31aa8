"""Engine: a loaded, optimised model that runs on the C++ executor.

One Engine serves any input shape the model admits: the first call with a new shape specialises
the optimised graph to it (folding the shape computations, choosing kernels, planning the arena)
and builds an executor; later calls with that shape reuse it. Prepacked weights are shared by
all of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_engine.errors import DTypeError, NonFiniteError, ShapeError
from cbir_engine.graph.ir import Graph
from cbir_engine.graph.passes import decompose_batchnorm, propagate, run_to_fixpoint
from cbir_engine.graph.passes.dead_nodes import remove_dead_nodes
from cbir_engine.graph.passes.remove_identity import remove_identity
from cbir_engine.plan import Plan, build_plan


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class Engine:
    """A model ready to run. Create with `cbir_engine.load` or `cbir_engine.from_torch`."""

    def __init__(self, graph: Graph, *, threads: int | None = None, check_finite: bool = False,
                 device: str = "cpu", opset: int | None = None,
                 packed: dict[tuple[str, str], np.ndarray] | None = None,
                 packed_only: set[str] | None = None, winograd: bool = True) -> None:
        from cbir_engine import _C

        if device != "cpu":
            raise ValueError(f"device {device!r} is not available in this build (only 'cpu')")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.graph = graph
        self.device = device
        self.opset = opset
        self.check_finite = check_finite
        self._pool = _C.ThreadPool(threads or 0)
        self._packed: dict[tuple[str, str], np.ndarray] = dict(packed or {})
        self._packed_only = frozenset(packed_only or ())
        self.winograd = winograd
        self._plans: dict[tuple, tuple[Plan, Any]] = {}
        self._lock = threading.Lock()
        for name in graph.inputs:
            v = graph.values[name]
            if v.dtype != np.float32:
                raise DTypeError(f"model input '{name}' is {v.dtype}; the engine runs float32 inputs")

    # ---- description ----
    @property
    def threads(self) -> int:
        return self._pool.threads

    @property
    def input_names(self) -> list[str]:
        return list(self.graph.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.output_names)

    @property
    def input_shapes(self) -> dict[str, tuple | None]:
        return {n: self.graph.values[n].shape for n in self.graph.inputs}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{list(s) if s else ''}" for n, s in self.input_shapes.items())
        outs = ", ".join(self.output_names)
        return f"Engine({shapes} -> {outs}; {len(self.graph.nodes)} nodes, {self.threads} threads)"

    # ---- running ----
    def __call__(self, *inputs: Any) -> Any:
        """engine(x) for a one-input model (or engine(x, y, ...) in input order).

        Returns the output (a tuple if the model has several), as numpy arrays, or torch tensors
        on the input's device when a torch tensor went in.
        """
        if len(inputs) != len(self.graph.inputs):
            raise ShapeError(f"the model takes {len(self.graph.inputs)} inputs "
                             f"({', '.join(self.graph.inputs)}), got {len(inputs)}")
        outs = self._run(dict(zip(self.graph.inputs, inputs, strict=True)))
        values = list(outs.values())
        return values[0] if len(values) == 1 else tuple(values)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Runs on {input name: array}; returns {output name: array}."""
        if not isinstance(feeds, Mapping):
            raise TypeError("run() takes a mapping {input name: array}")
        missing = [n for n in self.graph.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.graph.inputs]
        if missing or extra:
            raise ShapeError(f"inputs missing: {missing}, unknown: {extra}; "
                             f"the model takes {self.graph.inputs}")
        return self._run(feeds)

    def profile(self, feeds: Mapping[str, Any] | Any, repeat: int = 1) -> list[dict[str, Any]]:
        """Per-step wall time (ms, the minimum over `repeat` runs) and achieved GFLOP/s."""
        if not isinstance(feeds, Mapping):
            feeds = {self.graph.inputs[0]: feeds}
        arrays, _ = self._to_numpy(feeds)
        plan, ex = self._specialised(arrays)
        best: list[float] | None = None
        for _ in range(max(1, repeat)):
            _, times = ex.profile([arrays[n] for n in plan.input_names])
            best = list(times) if best is None else [min(a, b) for a, b in zip(best, times, strict=True)]
        rows = []
        for step, ns in zip(plan.steps, best or [], strict=True):
            ms = ns / 1e6
            rows.append({"node": step.node, "kernel": step.label, "ms": ms, "flops": step.flops,
                         "gflops": step.flops / ns if ns and step.flops else 0.0})
        return rows

    def _to_numpy(self, feeds: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Any]:
        arrays: dict[str, np.ndarray] = {}
        torch_like = None
        for name in self.graph.inputs:
            x = feeds[name]
            if _is_torch(x):
                torch_like = torch_like if torch_like is not None else x
                x = x.detach()
                if x.dtype.is_floating_point and str(x.dtype) != "torch.float32":
                    raise DTypeError(f"input '{name}' is {x.dtype}; the engine takes torch.float32")
                x = x.cpu().contiguous().numpy() if x.dtype.is_floating_point else x.cpu().numpy()
            elif not isinstance(x, np.ndarray):
                x = np.asarray(x)
            if x.dtype != np.float32:
                raise DTypeError(f"input '{name}' is {x.dtype}; the engine takes float32")
            arrays[name] = x if x.flags.c_contiguous else x.copy(order="C")
        return arrays, torch_like

    def _check_shapes(self, arrays: Mapping[str, np.ndarray]) -> None:
        symbols: dict[str, int] = {}
        for name in self.graph.inputs:
            want = self.graph.values[name].shape
            got = arrays[name].shape
            if want is None:
                continue
            if len(got) != len(want):
                raise ShapeError(f"input '{name}' has rank {len(got)} (shape {got}); "
                                 f"the model expects rank {len(want)} {list(want)}")
            for axis, (w, d) in enumerate(zip(want, got, strict=True)):
                if isinstance(w, int) and w != d:
                    raise ShapeError(f"input '{name}' has size {d} on axis {axis}; the model expects "
                                     f"{w} (shape {list(want)})")
                if isinstance(w, str):
                    if symbols.setdefault(w, d) != d:
                        raise ShapeError(f"dim '{w}' is {symbols[w]} in one input and {d} in '{name}'")
                    if d == 0:
                        raise ShapeError(f"input '{name}' is empty on axis {axis}")

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        arrays, torch_like = self._to_numpy(feeds)
        if self.check_finite:
            for name, a in arrays.items():
                if not np.isfinite(a).all():
                    raise NonFiniteError(f"input '{name}' contains NaN or infinity")
        plan, ex = self._specialised(arrays)
        results = ex.run([arrays[n] for n in plan.input_names])
        it = iter(results)
        outs: dict[str, Any] = {}
        for name, ref in zip(plan.output_names, plan.outputs, strict=True):
            outs[name] = ref.copy() if isinstance(ref, np.ndarray) else next(it)
        if self.check_finite:
            for name, a in outs.items():
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    raise NonFiniteError(f"output '{name}' contains NaN or infinity")
        if torch_like is not None:
            import torch

            outs = {k: torch.from_numpy(v).to(torch_like.device) for k, v in outs.items()}
        return outs

    # ---- specialisation ----
    def _pack(self, name: str, kind: str, make: Any) -> np.ndarray:
        key = (name, kind)
        if key not in self._packed:
            self._packed[key] = make()
        return self._packed[key]

    def _plan_key(self, shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...], ...]:
        """The key of the plan cache: the input shapes in the graph's input order."""
        return tuple(tuple(int(d) for d in shapes[n]) for n in self.graph.inputs)

    def _specialised(self, arrays: Mapping[str, np.ndarray]) -> tuple[Plan, Any]:
        self._check_shapes(arrays)
        key = self._plan_key({n: arrays[n].shape for n in self.graph.inputs})
        with self._lock:
            hit = self._plans.get(key)
            if hit is None:
                plan = self.plan_for(dict(zip(self.graph.inputs, key, strict=True)))
                hit = (plan, self._executor(plan))
                self._plans[key] = hit
                self._release_packed_sources(plan)
        return hit

    def _release_packed_sources(self, plan: Plan) -> None:
        """Drops the raw copy of weights the kernels read only prepacked (halving the memory of
        FC-heavy models). Kernel choices depend on the spatial dims, so this is done only when
        every input dim but the batch is fixed: no later shape can ask for another packing."""
        if not all(s is not None and all(isinstance(d, int) for d in s[1:])
                   for s in self.input_shapes.values()):
            return
        packed_names = {name for name, _ in self._packed}
        release = packed_names - plan.raw_constants - self._packed_only
        for name in release:
            v = self.graph.values.get(name)
            if v is not None and v.const is not None:
                v.const = np.broadcast_to(np.zeros((), v.const.dtype), v.const.shape)
        self._packed_only = self._packed_only | frozenset(release)

    def _executor(self, plan: Plan) -> Any:
        from cbir_engine import _C

        arena, constants, steps, inputs, outputs = plan.executor_args()
        return _C.Executor(self._pool, arena, constants, steps, inputs, outputs)

    def plan_for(self, shapes: Mapping[str, Sequence[int]]) -> Plan:
        """Specialises the graph to concrete input shapes and lowers it (no executor)."""
        g = self.graph.copy()
        for name in g.inputs:
            g.values[name].shape = tuple(int(d) for d in shapes[name])
        propagate(g, strict=True)
        run_to_fixpoint(g, [decompose_batchnorm, remove_identity, remove_dead_nodes])
        propagate(g, strict=True)
        return build_plan(g, self._pack, self._packed_only, self.winograd)

    def save(self, path: str | os.PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        """Saves the optimised graph with its prepacked weights (written atomically), for a fast
        `cbir_engine.load(path)`. Weights are packed for `input_shapes` (default: batch 1) first."""
        from cbir_engine.plan.serialize import save_plan

        plan = self.plan_for(input_shapes or self._default_shapes())
        packed_names = {name for name, _ in self._packed}
        save_plan(path, self.graph, self._packed, (packed_names - plan.raw_constants) | self._packed_only,
                  self.opset)

    def _default_shapes(self) -> dict[str, tuple[int, ...]]:
        """The last shapes run, else the declared ones with a symbolic batch dim set to 1."""
        if self._plans:
            key = next(reversed(self._plans))
            return dict(zip(self.graph.inputs, key, strict=True))
        shapes = {}
        for name in self.graph.inputs:
            s = self.graph.values[name].shape
            if s is None or any(isinstance(d, str) for d in s[1:]):
                raise ShapeError(f"input '{name}' has free dims {s}: pass input_shapes")
            shapes[name] = tuple(1 if isinstance(d, str) else d for d in s)
        return shapes

    def _plan_of(self, input_shapes: Mapping[str, Sequence[int]] | None) -> Plan:
        """The plan that runs for these shapes: the one already specialised, else a new one."""
        shapes = input_shapes or self._default_shapes()
        with self._lock:
            hit = self._plans.get(self._plan_key(shapes))
        return hit[0] if hit is not None else self.plan_for(shapes)

    def summary(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> str:
        """The optimised nodes and the kernel that runs each, plus the memory plan."""
        plan = self._plan_of(input_shapes)
        lines = [f"{'#':>4}  {'node':<44} {'kernel':<36} output shape"]
        for i, s in enumerate(plan.steps):
            out_shape = next((list(o.shape) for o in reversed(s.operands) if o is not None), [])
            lines.append(f"{i:>4}  {s.node[:44]:<44} {s.label[:36]:<36} {out_shape}")
        m = self.memory(plan=plan)
        lines.append(
            f"inputs {dict(zip(plan.input_names, plan.input_shapes, strict=True))}: "
            f"{len(plan.steps)} kernel steps; arena {m['arena_bytes'] / 2**20:.2f} MiB for "
            f"{m['intermediate_bytes'] / 2**20:.2f} MiB of intermediates "
            f"({m['intermediate_bytes'] / max(m['arena_bytes'], 1):.1f}x reuse); "
            f"weights {m['weight_bytes'] / 2**20:.2f} MiB"
        )
        return "\n".join(lines)

    def memory(self, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
               plan: Plan | None = None) -> dict[str, int]:
        """Arena size beside the sum of all intermediates (and the weights), in bytes."""
        plan = plan or self._plan_of(input_shapes)
        return {
            "arena_bytes": plan.arena_bytes,
            "intermediate_bytes": plan.intermediate_bytes,
            "weight_bytes": sum(c.nbytes for c in plan.constants),
        }

