"""The drop-in path for torch users.

- `from_torch(module, example)` exports the module to ONNX and loads it; the result behaves like
  the module (an `nn.Module`: callable, `.eval()` / `.train()`, torch tensors in and out on the
  input's device) and runs in the engine. In training mode it calls the original module, so
  gradients still work; in eval mode it runs the engine (inference: outputs carry no gradient).
- `torch.compile(model, backend="cbir_engine")` runs each graph dynamo captures in the engine
  (registered through the `torch_dynamo_backends` entry point when the package is installed;
  `register()` registers it by hand otherwise). Parameters and buffers become the engine's
  constants; a change to them (an optimiser step, `load_state_dict`) is noticed and the graph
  re-exported. Graphs that need gradients, or that the engine cannot run, fall back to eager
  torch with a warning.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from cbir_engine.runtime import Engine

try:
    import torch

    _ModuleBase: Any = torch.nn.Module
except ImportError:  # the engine runs without torch; only this drop-in path needs it
    torch = None  # type: ignore[assignment]
    _ModuleBase = object

BACKEND_NAME = "cbir_engine"


def export_onnx(module: Any, example_input: Any, *, opset: int = 17, dynamic_batch: bool = True,
                dynamo: bool = False) -> bytes:
    """ONNX bytes of `module` in eval mode, traced on `example_input` (batch dim dynamic)."""
    import torch

    module = module.eval()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    names = [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad():
        if dynamo:
            # Positional form: the dict form must use the forward()'s own argument names.
            dims = tuple({0: torch.export.Dim("batch")} for _ in names) if dynamic_batch else None
            prog = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                     output_names=["output"], dynamic_shapes=dims, opset_version=opset,
                                     verbose=False)
            return prog.model_proto.SerializeToString()  # type: ignore[union-attr]
        axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes=axes)
    return buf.getvalue()


class EngineModule(_ModuleBase):
    """A torch module backed by an Engine (what `from_torch` returns).

    eval mode (the default): runs the engine; torch tensors in give torch tensors out on the
    input's device (numpy in gives numpy out). train mode: runs the original module, if there is
    one. Attributes it does not have itself come from the Engine (`summary()`, `save()`,
    `profile()`, `input_names`, ...)."""

    def __init__(self, engine: Engine, module: Any = None) -> None:
        if torch is None:
            raise ImportError("EngineModule needs torch")
        super().__init__()
        self.engine = engine
        # Kept out of the module tree: its parameters are not this module's state.
        object.__setattr__(self, "_original", module)
        self.train(False)

    def forward(self, *inputs: Any) -> Any:
        original = self.__dict__.get("_original")
        if self.training and original is not None:
            return original(*inputs)
        return self.engine(*inputs)

    def train(self, mode: bool = True) -> EngineModule:
        super().train(mode)
        original = self.__dict__.get("_original")
        if original is not None:
            original.train(mode)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            engine = self.__dict__.get("engine")
            if engine is None or name.startswith("__"):
                raise
            return getattr(engine, name)

    def extra_repr(self) -> str:
        return repr(self.engine)


def from_torch(module: Any, example_input: Any, *, opset: int = 17, dynamo: bool = False,
               **load_kwargs: Any) -> EngineModule:
    """Exports `module` (in eval mode) to ONNX with a dynamic batch dim and loads it in the
    engine; returns an EngineModule that stands in for `module`."""
    from cbir_engine import load

    engine = load(export_onnx(module, example_input, opset=opset, dynamo=dynamo), **load_kwargs)
    return EngineModule(engine, module)


# ---------------------------------------------------------------- torch.compile backend
class _Frozen(_ModuleBase):
    """A dynamo graph with its parameters and buffers held as buffers (so they export as ONNX
    initialisers) and its integer arguments fixed: forward takes only the data tensors."""

    def __init__(self, gm: Any, args: Sequence[Any], data_pos: Sequence[int]) -> None:
        super().__init__()
        self.gm = gm
        self._layout: list[tuple[str, Any]] = []
        for i, a in enumerate(args):
            if i in data_pos:
                self._layout.append(("data", None))
            elif isinstance(a, torch.Tensor):
                self.register_buffer(f"state_{i}", a.detach())
                self._layout.append(("state", f"state_{i}"))
            else:
                self._layout.append(("const", a))

    def forward(self, *data: Any) -> Any:
        it = iter(data)
        full = [next(it) if kind == "data" else (getattr(self, v) if kind == "state" else v)
                for kind, v in self._layout]
        out = self.gm(*full)
        return tuple(out) if isinstance(out, (list, tuple)) else out


class _CompiledGraph:
    """What the backend returns for one dynamo graph: runs it in the engine, one engine per
    combination of input shapes and integer arguments (the engine specialises per shape anyway)."""

    def __init__(self, gm: Any, example_inputs: Sequence[Any]) -> None:
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # Parameters and buffers: dynamo passes them as inputs and marks them static.
        self.state_pos = {i for i, a in enumerate(example_inputs)
                          if isinstance(a, torch.Tensor)
                          and (isinstance(a, torch.nn.Parameter)
                               or getattr(a, "_dynamo_static_input_type", None))}
        self.n_inputs = len(placeholders)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self.returns_list = isinstance(out, list)
        self.engines: dict[tuple, tuple[Engine | None, tuple]] = {}
        self.warned = False

    def _warn(self, why: str) -> None:
        if not self.warned:
            warnings.warn(f"cbir_engine backend: running this graph in eager torch ({why})", stacklevel=3)
            self.warned = True

    def _state_stamp(self, args: Sequence[Any]) -> tuple:
        # The version counter moves on every in-place change (optimiser steps, load_state_dict).
        return tuple((i, args[i].data_ptr(), args[i]._version) for i in sorted(self.state_pos))

    def __call__(self, *args: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            self._warn("gradients are needed; the engine runs inference only - call it under "
                       "torch.no_grad() or torch.inference_mode()")
            return self.gm(*args)
        data_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in self.state_pos]
        data = [args[i] for i in data_pos]
        ints = tuple((i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
        key = (tuple((tuple(t.shape), t.dtype, t.device.type) for t in data), ints)
        stamp = self._state_stamp(args)
        hit = self.engines.get(key)
        if hit is None or hit[1] != stamp:
            hit = (self._build(args, data_pos, data), stamp)
            self.engines[key] = hit
        engine = hit[0]
        if engine is None:
            return self.gm(*args)
        outs = engine(*data) if data else engine()
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        return outs if self.returns_list else tuple(outs)

    def _build(self, args: Sequence[Any], data_pos: list[int], data: list[Any]) -> Engine | None:
        from cbir_engine import load
        from cbir_engine.errors import CbirError

        if not data or any(t.dtype != torch.float32 for t in data):
            self._warn("the engine takes float32 inputs only")
            return None
        frozen = _Frozen(self.gm, args, data_pos).eval()
        cpu_data = tuple(t.detach().cpu() for t in data)
        try:
            with torch.no_grad():
                ref = frozen(*cpu_data)
            refs = ref if isinstance(ref, tuple) else (ref,)
            if not all(isinstance(r, torch.Tensor) and r.dtype == torch.float32 for r in refs):
                self._warn("the graph returns something other than float32 tensors")
                return None
            names = [f"input_{i}" for i in range(len(cpu_data))]
            buf = io.BytesIO()
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about the fixed shapes are expected
                torch.onnx.export(frozen, cpu_data, buf, dynamo=False, opset_version=17, input_names=names,
                                  output_names=[f"output_{i}" for i in range(len(refs))])
            return load(buf.getvalue())
        except (CbirError, RuntimeError, TypeError, ValueError) as e:
            self._warn(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None


def cbir_engine_backend(gm: Any, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The torch.compile backend: `torch.compile(model, backend="cbir_engine")`."""
    if torch is None:
        raise ImportError("the cbir_engine backend needs torch")
    return _CompiledGraph(gm, example_inputs)


def register() -> None:
    """Registers the backend under the name "cbir_engine" (needed only where the package's entry
    point is not installed, e.g. when it runs from a source tree on PYTHONPATH)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS:
        register_backend(cbir_engine_backend, name=BACKEND_NAME)
