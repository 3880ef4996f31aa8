"""GpuEngine: an optimised Graph run on an NVIDIA GPU with the Triton or CUDA C++ kernels.

`cbir_engine.load(path, device="cuda", precision="fp16" | "bf16" | "fp32")` returns one. The graph
is the one the CPU engine runs (BN folded into the convs, activation and residual epilogues
fused); each input shape is specialised once and lowered to a list of steps:

- Conv (groups = 1 or grouped): the implicit-GEMM conv kernel, epilogue fused; depthwise convs
  (groups = channels) the depthwise kernel; MaxPool / AveragePool / GlobalAveragePool /
  GlobalMaxPool the pooling kernel; NetVLAD its three kernels. Backend "triton" (the default)
  launches the Triton kernels (cbir_engine/kernels); "cuda" calls the CUDA C++ kernels
  (csrc/cuda) through their C ABI on torch's current stream; "auto" times both on each
  convolution's shape once (cached per process) and keeps the faster, Triton for the rest.
- Elementwise ops, Concat, the channel affine of an unfolded BatchNorm, Gemm/MatMul (cuBLAS),
  Softmax, reductions, LRN, GeM, reshapes: torch's own CUDA kernels.
- Anything else: UnsupportedOpError at load, naming the op and the node.

Activations live on the GPU in NHWC (channels last) in the compute dtype; other ranks are kept in
their logical layout. Inputs are torch tensors (float32 or the compute dtype; numpy arrays are
copied to the device); outputs are float32 torch tensors on the engine's device.

Without torch, a CUDA build of torch or a visible GPU, construction raises DeviceUnavailableError.
device="cpu" is accepted only under TRITON_INTERPRET=1, where the Triton kernels run on the CPU:
that is how this path is tested on machines without a GPU.

On a GPU each input shape's steps are captured once into a CUDA graph (cuda_graphs=True, the
default) and replayed, so a call costs one graph launch, not one Python dispatch per kernel.

Not yet here (see the issue): launching the AOT cubins from the C++ executor (the kernels are
launched by Triton's Python launcher or through the CUDA library's C ABI), and keeping the
"auto" choices on disk across processes.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cbir_engine.errors import DeviceUnavailableError, DTypeError, ShapeError, UnsupportedOpError
from cbir_engine.graph.ir import Graph, Node
from cbir_engine.graph.ops import OPS, conv_geometry, full_pads, reduce_axes, slice_params, split_sizes
from cbir_engine.graph.passes import decompose_batchnorm, propagate, run_to_fixpoint
from cbir_engine.graph.passes.dead_nodes import remove_dead_nodes
from cbir_engine.graph.passes.remove_identity import remove_identity
from cbir_engine.graph.shapes import norm_axis, window_geometry
from cbir_engine.plan.lower import epilogue_activation

PRECISIONS = ("fp16", "bf16", "fp32")
BACKENDS = ("triton", "cuda", "auto")
KERNEL_OPS = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "NetVLAD"}
UNARY_OPS = {
    "Relu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "LeakyRelu",
    "Exp",
    "Log",
    "Sqrt",
    "Abs",
    "Neg",
    "Reciprocal",
    "Erf",
    "Floor",
    "Ceil",
    "Softplus",
    "Sign",
    "Elu",
    "HardSigmoid",
}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare"}
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
TORCH_OPS = (
    UNARY_OPS
    | BINARY_OPS
    | REDUCE_OPS
    | VIEW_OPS
    | {"Concat", "BatchNormalization", "Gemm", "MatMul", "Softmax", "LogSoftmax", "LRN", "GeM", "Transpose"}
    | {"LpNormalization", "Slice", "Split", "Pad"}
)
GPU_OPS = KERNEL_OPS | TORCH_OPS


# backend="auto": the kernel chosen per convolution shape, measured once per process.
_AUTO_CHOICES: dict[tuple, str] = {}


def pick_fastest(candidates: dict[str, Any], timer: Callable[[Any], float]) -> tuple[str, dict[str, float]]:
    """The name of the candidate `timer` finds fastest (the first on a tie; one that raises is
    out), with every time (inf for those that raised). Raises the last error if all fail."""
    times: dict[str, float] = {}
    error: Exception | None = None
    for name, fn in candidates.items():
        try:
            times[name] = float(timer(fn))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape is not chosen
            times[name] = math.inf
            error = e
    best = min(times, key=lambda n: times[n])
    if math.isinf(times[best]):
        assert error is not None
        raise error
    return best, times


def interpreting() -> bool:
    """TRITON_INTERPRET is set (the Triton kernels then run on the CPU); read without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise DeviceUnavailableError("device='cuda' needs torch with CUDA (pip install torch)") from e
    return torch


def _check_device(device: str) -> Any:
    torch = _torch()
    if device == "cpu":
        if not interpreting():
            raise DeviceUnavailableError(
                "the GPU engine runs on device='cpu' only under TRITON_INTERPRET=1 (for tests); "
                "use device='cuda'"
            )
        return torch.device("cpu")
    if not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={device!r}: no CUDA GPU is visible to torch (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'})"
        )
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def from_onnx(
    model: Any,
    *,
    device: str = "cuda",
    precision: str = "fp16",
    backend: str = "triton",
    optimize: bool = True,
    cuda_graphs: bool = True,
) -> GpuEngine:
    """Imports an ONNX model (path, bytes or ModelProto), runs the graph passes and returns a
    GpuEngine. (A CPU Engine's graph cannot be reused: it drops weights it keeps prepacked.)"""
    from cbir_engine.graph.passes import optimize as run_passes
    from cbir_engine.onnx.importer import import_model, read_model

    graph, opset = import_model(read_model(model))
    run_passes(graph, fuse=optimize)
    return GpuEngine(
        graph, device=device, precision=precision, backend=backend, opset=opset, cuda_graphs=cuda_graphs
    )


def unsupported_nodes(graph: Graph) -> list[Node]:
    """Nodes the GPU path has no kernel for (constant-folded shape computations excepted)."""
    return [n for n in graph.nodes if n.op not in GPU_OPS and not OPS[n.op].fold_only]


class _Env:
    """Run-time values of one call: tensor and whether it is held NHWC (rank-4 activations)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self.nhwc: set[str] = set()


Step = Callable[[_Env], None]


class GpuEngine:
    """A model ready to run on an NVIDIA GPU. Create with `cbir_engine.load(..., device="cuda")`."""

    def __init__(
        self,
        graph: Graph,
        *,
        device: str = "cuda",
        precision: str = "fp16",
        backend: str = "triton",
        opset: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.torch = torch = _torch()
        self.device = _check_device(device)
        bad = unsupported_nodes(graph)
        if bad:
            n = bad[0]
            others = sorted({b.op for b in bad[1:]} - {n.op})
            raise UnsupportedOpError(
                n.op,
                n.origin or n.name,
                n.opset,
                "no GPU kernel for this operator yet (device='cuda')"
                + (f"; also unsupported here: {', '.join(others)}" if others else ""),
            )
        for name in graph.inputs:
            if graph.values[name].dtype != np.float32:
                raise DTypeError(
                    f"model input '{name}' is {graph.values[name].dtype}; the engine runs float32 inputs"
                )
        if backend in ("cuda", "auto") and self.device.type != "cuda":
            raise DeviceUnavailableError(f"backend={backend!r} runs the CUDA C++ kernels and needs a GPU")
        self.graph = graph
        self.opset = opset
        self.precision = precision
        self.backend = backend
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        self._consts: dict[tuple[str, str], Any] = {}
        self._plans: dict[tuple, tuple[Graph, list[Step]]] = {}
        self._lock = threading.Lock()
        self._cuda_lib: Any = None
        self.cuda_graphs = cuda_graphs
        self.choices: dict[str, tuple[str, dict[str, float]]] = {}  # backend="auto": node -> (kernel, ms)
        self._graphs: dict[tuple, tuple[Any, dict[str, Any], dict[str, Any]]] = {}

    # ---- description ----
    @property
    def input_names(self) -> list[str]:
        return list(self.graph.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.output_names)

    def __repr__(self) -> str:
        return (
            f"GpuEngine({', '.join(self.graph.inputs)} -> {', '.join(self.output_names)}; "
            f"{len(self.graph.nodes)} nodes, {self.device}, {self.precision}, {self.backend})"
        )

    # ---- running ----
    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.graph.inputs):
            raise ShapeError(
                f"the model takes {len(self.graph.inputs)} inputs ({', '.join(self.graph.inputs)}), "
                f"got {len(inputs)}"
            )
        outs = self.run(dict(zip(self.graph.inputs, inputs, strict=True)))
        values = list(outs.values())
        return values[0] if len(values) == 1 else tuple(values)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Runs on {input name: tensor}; returns {output name: float32 tensor on the device}."""
        missing = [n for n in self.graph.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.graph.inputs]
        if missing or extra:
            raise ShapeError(
                f"inputs missing: {missing}, unknown: {extra}; the model takes {self.graph.inputs}"
            )
        tensors = {name: self._input(name, feeds[name]) for name in self.graph.inputs}
        g, steps = self._specialised({n: tuple(t.shape) for n, t in tensors.items()})
        if self.cuda_graphs and self.device.type == "cuda":
            return self._replay(g, steps, tensors)
        return self._execute(g, steps, tensors)

    def _execute(self, g: Graph, steps: list[Step], tensors: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        env = _Env()
        for name, t in tensors.items():
            if t.dim() == 4:  # NCHW in, NHWC inside: one permute-and-cast copy
                env.tensors[name] = t.permute(0, 2, 3, 1).to(self.dtype).contiguous()
                env.nhwc.add(name)
            else:
                env.tensors[name] = t.to(self.dtype).contiguous()
        with torch.inference_mode():
            for step in steps:
                step(env)
            return {
                user: self._plain(env, g, name).float()
                for user, name in zip(self.graph.output_names, g.outputs, strict=True)
            }

    def _replay(self, g: Graph, steps: list[Step], tensors: dict[str, Any]) -> dict[str, Any]:
        """Runs through a CUDA graph captured once per input shapes and dtypes: one launch for the
        whole network instead of one per kernel. The inputs are copied into the graph's static
        buffers and the outputs copied out (a later replay overwrites the static ones). The graph
        replays on the caller's current stream."""
        torch = self.torch
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                static_in = {n: t.clone() for n, t in tensors.items()}
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up: Triton compiles, the caching allocator fills
                    for _ in range(2):
                        self._execute(g, steps, static_in)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._execute(g, steps, static_in)
                entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for n, t in tensors.items():
            static_in[n].copy_(t)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _input(self, name: str, x: Any) -> Any:
        torch = self.torch
        if isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise DTypeError(f"input '{name}' is {x.dtype}; the engine takes float32")
            x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if not isinstance(x, torch.Tensor):
            raise DTypeError(
                f"input '{name}' must be a torch tensor or a numpy array, got {type(x).__name__}"
            )
        if x.dtype not in (torch.float32, self.dtype):
            raise DTypeError(f"input '{name}' is {x.dtype}; the engine takes torch.float32 or {self.dtype}")
        if x.device.type != self.device.type:
            raise DTypeError(f"input '{name}' is on {x.device}; this engine runs on {self.device}")
        want = self.graph.values[name].shape
        if want is not None:
            if len(want) != x.dim():
                raise ShapeError(f"input '{name}' has rank {x.dim()}; the model expects {list(want)}")
            for axis, (w, d) in enumerate(zip(want, x.shape, strict=True)):
                if isinstance(w, int) and w != d:
                    raise ShapeError(
                        f"input '{name}' has size {d} on axis {axis}; the model expects {list(want)}"
                    )
                if d == 0:
                    raise ShapeError(f"input '{name}' is empty on axis {axis}")
        return x

    # ---- specialisation ----
    def _specialised(self, shapes: dict[str, tuple[int, ...]]) -> tuple[Graph, list[Step]]:
        key = tuple(shapes[n] for n in self.graph.inputs)
        with self._lock:
            hit = self._plans.get(key)
            if hit is None:
                g = self.graph.copy()
                for name in g.inputs:
                    g.values[name].shape = tuple(int(d) for d in shapes[name])
                propagate(g, strict=True)
                run_to_fixpoint(g, [decompose_batchnorm, remove_identity, remove_dead_nodes])
                propagate(g, strict=True)
                nodes = [node for node in g.nodes if not self._folded(g, node)]
                hit = (g, self._with_releases(g, nodes, [self._lower(g, node) for node in nodes]))
                self._plans[key] = hit
        return hit

    @staticmethod
    def _with_releases(g: Graph, nodes: list[Node], steps: list[Step]) -> list[Step]:
        """Each step followed by dropping the values no later step reads (graph outputs kept), so
        memory is reused along the network instead of holding every intermediate to the end."""
        last: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.inputs:
                if name:
                    last[name] = i
        keep = set(g.outputs)
        drops: list[list[str]] = [[] for _ in nodes]
        for name, i in last.items():
            if name not in keep:
                drops[i].append(name)

        def releasing(step: Step, names: list[str]) -> Step:
            if not names:
                return step

            def run(env: _Env) -> None:
                step(env)
                for name in names:
                    env.tensors.pop(name, None)
                    env.nhwc.discard(name)

            return run

        return [releasing(step, names) for step, names in zip(steps, drops, strict=True)]

    @staticmethod
    def _folded(g: Graph, node: Node) -> bool:
        return all(g.values[o].const is not None for o in node.outputs)

    # ---- values ----
    def _const(
        self, g: Graph, name: str, kind: str = "act", make: Callable[[np.ndarray], Any] | None = None
    ) -> Any:
        """A constant on the device: activations-dtype floats (kind 'act'), fp32 ('f32'), or `make`."""
        key = (name, kind)
        if key not in self._consts:
            arr = g.const(name)
            if arr is None:
                raise UnsupportedOpError("Constant", name, None, "expected a constant input here")
            if make is not None:
                self._consts[key] = make(np.asarray(arr))
            elif np.asarray(arr).dtype.kind == "f":
                dt = self.dtype if kind == "act" else self.torch.float32
                self._consts[key] = self.torch.from_numpy(np.array(arr, np.float32)).to(self.device, dt)
            else:
                self._consts[key] = self.torch.from_numpy(np.array(arr)).to(self.device)
        return self._consts[key]

    def _plain(self, env: _Env, g: Graph, name: str) -> Any:
        """The value in its logical layout (NCHW for rank 4)."""
        if name not in env.tensors:
            return self._const(g, name)
        t = env.tensors[name]
        return t.permute(0, 3, 1, 2).contiguous() if name in env.nhwc else t

    def _nhwc(self, env: _Env, g: Graph, name: str) -> Any:
        """A rank-4 value as a contiguous NHWC tensor."""
        if name in env.nhwc:
            return env.tensors[name]
        return self._plain(env, g, name).permute(0, 2, 3, 1).contiguous()

    def _nhwc_view(self, env: _Env, g: Graph, name: str, rank: int) -> Any:
        """An operand of a rank-4 elementwise op as an NHWC-ordered view (broadcasting kept)."""
        if name in env.nhwc:
            return env.tensors[name]
        t = self._plain(env, g, name)
        t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
        return t.permute(0, 2, 3, 1)

    @staticmethod
    def _set(env: _Env, name: str, t: Any, nhwc: bool) -> None:
        env.tensors[name] = t
        if nhwc:
            env.nhwc.add(name)
        else:
            env.nhwc.discard(name)

    def _empty(self, shape: tuple[int, ...]) -> Any:
        return self.torch.empty(shape, dtype=self.dtype, device=self.device)

    def _stream(self) -> Any:
        return self.torch.cuda.current_stream(self.device).cuda_stream

    def _cuda(self) -> Any:
        if self._cuda_lib is None:
            from cbir_engine.gpu import cuda_lib

            major, minor = self.torch.cuda.get_device_capability(self.device)
            self._cuda_lib = cuda_lib.library(f"sm_{major}{minor}")
        return self._cuda_lib

    @staticmethod
    def _check(rc: int, node: Node) -> None:
        if rc != 0:
            raise RuntimeError(f"{node.describe()}: CUDA kernel failed with code {rc}")

    # ---- lowering ----
    def _lower(self, g: Graph, node: Node) -> Step:
        op = node.op
        if op == "Conv":
            return self._lower_conv(g, node)
        if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
            return self._lower_pool(g, node)
        if op == "NetVLAD":
            return self._lower_netvlad(g, node)
        return self._lower_torch(g, node)

    def _lower_conv(self, g: Graph, node: Node) -> Step:
        x_shape, w_shape = g.values[node.inputs[0]].shape, g.values[node.inputs[1]].shape
        if len(x_shape) != 4:
            raise UnsupportedOpError(
                "Conv",
                node.origin or node.name,
                node.opset,
                f"{len(x_shape) - 2}-D convolution (the GPU path runs 2-D)",
            )
        if g.const(node.inputs[1]) is None:
            raise UnsupportedOpError(
                "Conv", node.origin or node.name, node.opset, "weights computed at run time"
            )
        out, pb, _ = conv_geometry(node, x_shape, w_shape)
        a = node.attrs
        stride = tuple(a.get("strides") or (1, 1))
        dil = tuple(a.get("dilations") or (1, 1))
        groups = int(a.get("group", 1))
        n, c, h, w = (int(d) for d in x_shape)
        k, _, kh, kw = (int(d) for d in w_shape)
        oh, ow = (int(d) for d in out)
        act, lo, hi = epilogue_activation(node)
        depthwise = groups == c == k and c > 1
        torch = self.torch
        if depthwise:
            wp = self._const(
                g,
                node.inputs[1],
                "dw",
                lambda arr: torch.from_numpy(
                    np.ascontiguousarray(arr[:, 0].transpose(1, 2, 0), np.float32)
                ).to(self.device, self.dtype),
            )
        else:
            wp = self._const(
                g,
                node.inputs[1],
                "gemm",
                lambda arr: torch.from_numpy(
                    np.ascontiguousarray(
                        arr.reshape(groups, k // groups, c // groups, kh, kw).transpose(0, 3, 4, 2, 1),
                        np.float32,
                    )
                ).to(self.device, self.dtype),
            )
        bias = self._const(g, node.input(2), "f32") if node.input(2) else None
        res_name = node.input(3)
        x_name, y_name = node.inputs[0], node.outputs[0]
        geo = dict(stride=stride, pads=(int(pb[0]), int(pb[1])), dilation=dil)
        # A pre-activation BatchNorm(+ReLU) that the graph passes folded into this conv (inputs 4
        # and 5, fuse_input_affine): applied to the input here, per channel (NHWC: the last dim).
        in_scale = self._const(g, node.input(4), "f32") if node.input(4) else None
        in_shift = self._const(g, node.input(5), "f32") if node.input(4) else None
        in_relu = node.attrs.get("input_activation") == "Relu"

        def conv_input(env: _Env) -> Any:
            xx = self._nhwc(env, g, x_name)
            if in_scale is None:
                return xx
            xx = xx.float() * in_scale + in_shift
            return (xx.clamp_min(0.0) if in_relu else xx).to(self.dtype).contiguous()

        if self.backend in ("triton", "auto"):
            from cbir_engine.kernels import conv as tconv
            from cbir_engine.kernels import depthwise as tdw

            def run(env: _Env) -> None:
                y = self._empty((n, oh, ow, k))
                r = self._nhwc(env, g, res_name) if res_name else None
                xx = conv_input(env)
                if depthwise:
                    tdw.depthwise_nhwc(xx, wp, bias, out=y, residual=r, act=act, act_lo=lo, act_hi=hi, **geo)
                else:
                    tconv.conv2d_nhwc(
                        xx, wp, bias, out=y, residual=r, groups=groups, act=act, act_lo=lo, act_hi=hi, **geo
                    )
                self._set(env, y_name, y, True)

            if self.backend == "triton":
                return run

        import ctypes

        from cbir_engine.gpu import cuda_lib

        desc = cuda_lib.ConvDesc(
            n=n,
            h=h,
            w=w,
            c=c,
            k=k,
            kh=kh,
            kw=kw,
            oh=oh,
            ow=ow,
            stride_h=stride[0],
            stride_w=stride[1],
            pad_h=int(pb[0]),
            pad_w=int(pb[1]),
            dil_h=dil[0],
            dil_w=dil[1],
            groups=groups,
            act=act,
            act_lo=lo,
            act_hi=hi,
        )
        code = cuda_lib.DTYPE_CODES[self.precision]

        def run_cuda(env: _Env) -> None:
            lib = self._cuda()
            y = self._empty((n, oh, ow, k))
            r = self._nhwc(env, g, res_name) if res_name else None
            xx = conv_input(env)
            fn = lib.cbir_depthwise_nhwc_cuda if depthwise else lib.cbir_conv2d_nhwc_cuda
            rc = fn(
                ctypes.byref(desc),
                code,
                xx.data_ptr(),
                wp.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                r.data_ptr() if r is not None else None,
                y.data_ptr(),
                self._stream(),
            )
            self._check(rc, node)
            self._set(env, y_name, y, True)

        if self.backend == "cuda":
            return run_cuda
        key = (
            "conv",
            self.precision,
            depthwise,
            n,
            h,
            w,
            c,
            k,
            kh,
            kw,
            stride,
            tuple(pb),
            dil,
            groups,
            act,
            bool(res_name),
        )
        shapes = {x_name: (n, h, w, c), **({res_name: (n, oh, ow, k)} if res_name else {})}
        return self._choose(node, key, {"triton": run, "cuda": run_cuda}, shapes)

    def _choose(self, node: Node, key: tuple, candidates: dict[str, Step], shapes: dict[str, tuple]) -> Step:
        """backend="auto": times each candidate once on random inputs of the layer's shapes (CUDA
        events, median of 5 after 2 warm-ups) and keeps the fastest; choices are cached per layer
        shape for the process, so each shape is measured once."""
        torch = self.torch
        name = pick = _AUTO_CHOICES.get(key)
        if pick is None:
            env = _Env()
            for value, shape in shapes.items():
                self._set(env, value, torch.randn(shape, device=self.device).to(self.dtype), True)

            def timer(step: Step) -> float:
                for _ in range(2):
                    step(env)
                times = []
                for _ in range(5):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    step(env)
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                return sorted(times)[len(times) // 2]

            name, times = pick_fastest(candidates, timer)
            _AUTO_CHOICES[key] = name
            self.choices[node.name or node.outputs[0]] = (name, times)
        return candidates[name]

    def _lower_pool(self, g: Graph, node: Node) -> Step:
        x_shape = tuple(int(d) for d in g.values[node.inputs[0]].shape)
        y_shape = tuple(int(d) for d in g.values[node.outputs[0]].shape)
        if len(x_shape) != 4:
            raise UnsupportedOpError(
                node.op,
                node.origin or node.name,
                node.opset,
                f"{len(x_shape) - 2}-D pooling (the GPU path runs 2-D)",
            )
        n, c, h, w = x_shape
        a = node.attrs
        if node.op.startswith("Global"):
            kernel, stride, dil, pb, pe = (h, w), (1, 1), (1, 1), (0, 0), (0, 0)
        else:
            kernel = tuple(a["kernel_shape"])
            stride = tuple(a.get("strides") or (1, 1))
            dil = tuple(a.get("dilations") or (1, 1))
            _, pb, pe = window_geometry(
                (h, w),
                kernel,
                stride,
                dil,
                a.get("pads") or [0] * 4,
                a.get("auto_pad", "NOTSET"),
                bool(a.get("ceil_mode", 0)),
            )
        is_max = "Max" in node.op
        count_pad = bool(a.get("count_include_pad", 0))
        if not is_max and dil != (1, 1):
            raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, "dilated average pooling")
        oh, ow = y_shape[2], y_shape[3]
        pads = (int(pb[0]), int(pb[1]), int(pe[0]), int(pe[1]))
        x_name, y_name = node.inputs[0], node.outputs[0]
        # fuse_input_affine: a pre-activation BatchNorm (+ReLU) folded into an average pool; here
        # it runs before the pool kernel, on the NHWC tensor (channels last, so it broadcasts).
        affine = None
        if len(node.inputs) > 1 and node.input(1):
            affine = (self._const(g, node.input(1), "act"), self._const(g, node.input(2), "act"),
                      a.get("input_activation") == "Relu")

        def source(env: _Env) -> Any:
            x = self._nhwc(env, g, x_name)
            if affine is None:
                return x
            scale, shift, relu = affine
            x = self.torch.addcmul(shift, x, scale)
            return self.torch.relu(x) if relu else x

        if self.backend == "triton":
            from cbir_engine.kernels.pool import pool_nhwc

            def run(env: _Env) -> None:
                y = self._empty((n, oh, ow, c))
                pool_nhwc(
                    source(env),
                    out=y,
                    kernel=kernel,
                    stride=stride,
                    pads=pads,
                    dilation=dil,
                    is_max=is_max,
                    count_include_pad=count_pad,
                )
                self._set(env, y_name, y, True)

            return run

        import ctypes

        from cbir_engine.gpu import cuda_lib

        desc = cuda_lib.PoolDesc(
            n=n,
            h=h,
            w=w,
            c=c,
            oh=oh,
            ow=ow,
            kh=kernel[0],
            kw=kernel[1],
            stride_h=stride[0],
            stride_w=stride[1],
            pad_top=pads[0],
            pad_left=pads[1],
            pad_bottom=pads[2],
            pad_right=pads[3],
            dil_h=dil[0],
            dil_w=dil[1],
            is_max=int(is_max),
            count_include_pad=int(count_pad),
        )
        code = cuda_lib.DTYPE_CODES[self.precision]

        def run_cuda(env: _Env) -> None:
            y = self._empty((n, oh, ow, c))
            rc = self._cuda().cbir_pool_nhwc_cuda(
                ctypes.byref(desc), code, source(env).contiguous().data_ptr(), y.data_ptr(), self._stream()
            )
            self._check(rc, node)
            self._set(env, y_name, y, True)

        return run_cuda

    def _lower_netvlad(self, g: Graph, node: Node) -> Step:
        torch = self.torch
        x_shape = tuple(int(d) for d in g.values[node.inputs[0]].shape)
        k, d = (int(v) for v in g.values[node.inputs[1]].shape)
        if k > 256:
            raise UnsupportedOpError(
                "NetVLAD", node.origin or node.name, node.opset, f"{k} clusters (at most 256)"
            )
        n, hw = x_shape[0], math.prod(x_shape[2:])
        a = node.attrs
        w_t = self._const(
            g,
            node.inputs[1],
            "netvlad_wt",
            lambda arr: torch.from_numpy(np.ascontiguousarray(arr.T, np.float32)).to(self.device, self.dtype),
        )
        bias = self._const(g, node.input(2), "f32") if node.input(2) else None
        cent = self._const(g, node.inputs[3], "f32")
        x_name, y_name = node.inputs[0], node.outputs[0]
        eps = (float(a["eps_in"]), float(a["eps_intra"]), float(a["eps_out"]))

        def features(env: _Env) -> Any:
            if len(x_shape) == 4:
                return self._nhwc(env, g, x_name)
            return self._plain(env, g, x_name).reshape(n, d, hw).transpose(1, 2).contiguous()

        if self.backend == "triton":
            from cbir_engine.kernels.netvlad import netvlad_nhwc

            def run(env: _Env) -> None:
                y = self._empty((n, k * d))
                netvlad_nhwc(
                    features(env),
                    w_t,
                    bias,
                    cent,
                    out=y,
                    normalize_input=bool(a["normalize_input"]),
                    eps_in=eps[0],
                    eps_intra=eps[1],
                    eps_out=eps[2],
                )
                self._set(env, y_name, y, False)

            return run

        import ctypes

        from cbir_engine.gpu import cuda_lib

        desc = cuda_lib.NetVLADDesc(
            n=n,
            hw=hw,
            d=d,
            k=k,
            normalize_input=int(a["normalize_input"]),
            eps_in=eps[0],
            eps_intra=eps[1],
            eps_out=eps[2],
        )
        code = cuda_lib.DTYPE_CODES[self.precision]

        def run_cuda(env: _Env) -> None:
            lib = self._cuda()
            ws_bytes = lib.cbir_netvlad_cuda_workspace(ctypes.byref(desc))
            ws = torch.empty(ws_bytes, dtype=torch.uint8, device=self.device)
            y = self._empty((n, k * d))
            rc = lib.cbir_netvlad_nhwc_cuda(
                ctypes.byref(desc),
                code,
                features(env).data_ptr(),
                w_t.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                cent.data_ptr(),
                y.data_ptr(),
                ws.data_ptr(),
                ws_bytes,
                self._stream(),
            )
            self._check(rc, node)
            self._set(env, y_name, y, False)

        return run_cuda

    # ---- torch's CUDA kernels for the rest ----
    def _activation(self, node: Node) -> Callable[[Any], Any]:
        torch = self.torch
        act = node.attrs.get("activation", "")
        p = node.attrs.get("activation_attrs", {})
        if not act:
            return lambda t: t
        if act == "Relu":
            return torch.relu
        if act == "Sigmoid":
            return torch.sigmoid
        if act == "Clip":
            lo, hi = p.get("min"), p.get("max")
            return lambda t: torch.clamp(t, min=lo, max=hi)
        if act == "LeakyRelu":
            alpha = float(p.get("alpha", 0.01))
            return lambda t: torch.nn.functional.leaky_relu(t, alpha)
        raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, f"fused activation {act}")

    def _unary(self, node: Node) -> Callable[[Any], Any]:
        torch = self.torch
        F = torch.nn.functional
        a = node.attrs
        op = node.op
        if op == "Clip":
            lo, hi = a.get("min"), a.get("max")
            return lambda t: torch.clamp(t, min=lo, max=hi)
        if op == "LeakyRelu":
            return lambda t: F.leaky_relu(t, float(a.get("alpha", 0.01)))
        if op == "Elu":
            return lambda t: F.elu(t, float(a.get("alpha", 1.0)))
        if op == "HardSigmoid":
            al, be = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            return lambda t: torch.clamp(t * al + be, 0.0, 1.0)
        if op == "Reciprocal":
            return torch.reciprocal
        return {
            "Relu": torch.relu,
            "Sigmoid": torch.sigmoid,
            "Tanh": torch.tanh,
            "Exp": torch.exp,
            "Log": torch.log,
            "Sqrt": torch.sqrt,
            "Abs": torch.abs,
            "Neg": torch.neg,
            "Erf": torch.erf,
            "Floor": torch.floor,
            "Ceil": torch.ceil,
            "Softplus": F.softplus,
            "Sign": torch.sign,
        }[op]

    def _lower_torch(self, g: Graph, node: Node) -> Step:
        torch = self.torch
        op = node.op
        out = node.outputs[0]
        out_shape = tuple(int(d) for d in g.values[out].shape)
        act = self._activation(node)
        ins = [i for i in node.inputs if i]
        a = node.attrs

        if op in UNARY_OPS or op == "BatchNormalization":
            if op == "BatchNormalization":
                scale, bias, mean, var = (
                    np.asarray(g.const(p), np.float64).reshape(-1) for p in node.inputs[1:5]
                )
                mul = scale / np.sqrt(var + a.get("epsilon", 1e-5))
                add = bias - mean * mul
                s = torch.from_numpy(mul.astype(np.float32)).to(self.device, self.dtype)
                h_ = torch.from_numpy(add.astype(np.float32)).to(self.device, self.dtype)

                def fn(t: Any, nhwc: bool) -> Any:
                    view = (-1,) if nhwc else (-1,) + (1,) * (t.dim() - 2)
                    return t * s.reshape(view) + h_.reshape(view)
            else:
                f = self._unary(node)

                def fn(t: Any, nhwc: bool) -> Any:
                    return f(t)

            def run_unary(env: _Env) -> None:
                nhwc = ins[0] in env.nhwc
                t = env.tensors[ins[0]] if ins[0] in env.tensors else self._const(g, ins[0])
                self._set(env, out, act(fn(t, nhwc)).contiguous(), nhwc)

            return run_unary

        if op in BINARY_OPS:
            f = {
                "Add": torch.add,
                "Sub": torch.sub,
                "Mul": torch.mul,
                "Div": torch.div,
                "Pow": torch.pow,
                "Max": torch.maximum,
                "Min": torch.minimum,
            }[op]

            # A third input is a residual added before the activation (fuse_residual_eltwise).
            def run_binary(env: _Env) -> None:
                if len(out_shape) == 4:
                    x, y, *r = (self._nhwc_view(env, g, i, 4) for i in ins)
                    self._set(env, out, act(f(x, y) + r[0] if r else f(x, y)).contiguous(), True)
                else:
                    x, y, *r = (self._plain(env, g, i) for i in ins)
                    self._set(env, out, act(f(x, y) + r[0] if r else f(x, y)).contiguous(), False)

            return run_binary

        if op in VIEW_OPS:

            def run_view(env: _Env) -> None:
                self._set(env, out, act(self._plain(env, g, ins[0]).reshape(out_shape)), False)

            return run_view

        if op == "Concat":
            axis = norm_axis(a.get("axis", 1), len(out_shape))

            def run_concat(env: _Env) -> None:
                if len(out_shape) == 4:
                    dim = (0, 3, 1, 2)[axis]
                    parts = [self._nhwc(env, g, i) for i in ins]
                    self._set(env, out, act(torch.cat(parts, dim=dim)), True)
                else:
                    self._set(
                        env, out, act(torch.cat([self._plain(env, g, i) for i in ins], dim=axis)), False
                    )

            return run_concat

        if op == "Transpose":
            perm = a.get("perm") or list(range(len(out_shape)))[::-1]

            def run_transpose(env: _Env) -> None:
                self._set(env, out, self._plain(env, g, ins[0]).permute(*perm).contiguous(), False)

            return run_transpose

        if op == "Gemm":
            ta, tb = bool(a.get("transA", 0)), bool(a.get("transB", 0))
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            c_name = node.input(2)

            def run_gemm(env: _Env) -> None:
                x = self._plain(env, g, node.inputs[0])
                w = self._plain(env, g, node.inputs[1])
                x = x.t() if ta else x
                w = w.t() if tb else w
                y = torch.matmul(x, w)
                if alpha != 1.0:
                    y = y * alpha
                if c_name and beta != 0.0:
                    y = y + beta * self._plain(env, g, c_name)
                self._set(env, out, act(y).contiguous(), False)

            return run_gemm

        if op == "MatMul":

            def run_matmul(env: _Env) -> None:
                y = torch.matmul(self._plain(env, g, ins[0]), self._plain(env, g, ins[1]))
                self._set(env, out, act(y).contiguous(), False)

            return run_matmul

        if op in ("Softmax", "LogSoftmax"):
            in_shape = tuple(int(d) for d in g.values[ins[0]].shape)
            axis = norm_axis(a.get("axis", -1), len(in_shape))
            legacy = bool(a.get("legacy"))
            f = torch.softmax if op == "Softmax" else torch.log_softmax

            def run_softmax(env: _Env) -> None:
                x = self._plain(env, g, ins[0])
                if legacy:
                    y = f(x.reshape(math.prod(in_shape[:axis]), -1).float(), dim=1).reshape(in_shape)
                else:
                    y = f(x.float(), dim=axis)
                self._set(env, out, y.to(self.dtype), False)

            return run_softmax

        if op in REDUCE_OPS:
            in_shape = tuple(int(d) for d in g.values[ins[0]].shape)
            if len(ins) > 1:  # opset 18: axes as an input (constant after specialisation)
                axes_const = g.const(ins[1])
                if axes_const is None:
                    raise UnsupportedOpError(
                        op, node.origin or node.name, node.opset, "axes computed at run time"
                    )
                node = Node(op, [ins[0]], node.outputs, {**a, "axes": [int(v) for v in np.ravel(axes_const)]})
            axes = reduce_axes(node, len(in_shape))
            keep = bool(a.get("keepdims", 1))

            def reduce(x: Any) -> Any:
                x = x.float()
                if not axes:
                    return x
                if op == "ReduceMean":
                    return x.mean(dim=axes, keepdim=keep)
                if op == "ReduceSum":
                    return x.sum(dim=axes, keepdim=keep)
                if op == "ReduceSumSquare":
                    return (x * x).sum(dim=axes, keepdim=keep)
                if op == "ReduceL2":
                    return torch.sqrt((x * x).sum(dim=axes, keepdim=keep))
                if op == "ReduceL1":
                    return x.abs().sum(dim=axes, keepdim=keep)
                y = x
                for ax in sorted(axes, reverse=True):
                    y = (y.amax if op == "ReduceMax" else y.amin)(dim=ax, keepdim=keep)
                return y

            def run_reduce(env: _Env) -> None:
                y = reduce(self._plain(env, g, ins[0])).reshape(out_shape)
                self._set(env, out, act(y.to(self.dtype)), False)

            return run_reduce

        if op == "LRN":
            size, alpha, beta, bias_ = (
                int(a["size"]),
                a.get("alpha", 1e-4),
                a.get("beta", 0.75),
                a.get("bias", 1.0),
            )

            def run_lrn(env: _Env) -> None:
                x = self._plain(env, g, ins[0]).float()
                y = torch.nn.functional.local_response_norm(x, size, alpha, beta, bias_)
                self._set(env, out, y.to(self.dtype), False)

            return run_lrn

        if op == "GeM":
            p, q, eps = float(a["p"]), float(a["q"]), float(a["eps"])

            def run_gem(env: _Env) -> None:
                x = self._plain(env, g, ins[0]).float()
                dims = tuple(range(2, x.dim()))
                y = x.clamp(min=eps).pow(p).mean(dim=dims, keepdim=True).pow(q)
                self._set(env, out, y.to(self.dtype), False)

            return run_gem

        if op == "LpNormalization":
            in_rank = len(g.values[ins[0]].shape)
            axis, p = norm_axis(a.get("axis", -1), in_rank), int(a.get("p", 2))

            def run_lp(env: _Env) -> None:
                x = self._plain(env, g, ins[0]).float()
                y = x / x.norm(p=p, dim=axis, keepdim=True)
                self._set(env, out, y.to(self.dtype), False)

            return run_lp

        if op == "Slice":
            in_shape = tuple(int(d) for d in g.values[ins[0]].shape)
            consts = [g.const(i) if i else None for i in node.inputs[1:]] + [None] * (5 - len(node.inputs))
            index: list[slice] = [slice(None)] * len(in_shape)
            for axis, start, end, step in slice_params(node, len(in_shape), *consts[:4]):
                if step < 1:
                    raise UnsupportedOpError(
                        op, node.origin or node.name, node.opset, "negative or zero slice steps"
                    )
                index[axis] = slice(*slice(start, end, step).indices(in_shape[axis]))

            def run_slice(env: _Env) -> None:
                self._set(env, out, self._plain(env, g, ins[0])[tuple(index)].contiguous(), False)

            return run_slice

        if op == "Split":
            in_shape = tuple(int(d) for d in g.values[ins[0]].shape)
            axis = norm_axis(a.get("axis", 0), len(in_shape))
            if len(ins) > 1:
                sizes_const = g.const(ins[1])
                if sizes_const is None:
                    raise UnsupportedOpError(
                        op, node.origin or node.name, node.opset, "split sizes computed at run time"
                    )
                sizes = [int(v) for v in np.ravel(sizes_const)]
            else:
                sizes = split_sizes(node, in_shape[axis])
            outs = list(node.outputs)

            def run_split(env: _Env) -> None:
                for name, part in zip(
                    outs, torch.split(self._plain(env, g, ins[0]), sizes, dim=axis), strict=True
                ):
                    if name:
                        self._set(env, name, part.contiguous(), False)

            return run_split

        if op == "Pad":
            mode = a.get("mode", "constant")
            if mode != "constant":
                raise UnsupportedOpError(op, node.origin or node.name, node.opset, f"{mode} padding")
            rank = len(out_shape)
            pads = full_pads(node, rank)
            if any(p < 0 for p in pads):
                raise UnsupportedOpError(op, node.origin or node.name, node.opset, "negative pads (crops)")
            flat: list[int] = []
            for d in reversed(range(rank)):  # torch wants (last begin, last end, previous begin, ...)
                flat += [pads[d], pads[rank + d]]
            value = float(a.get("value", 0.0))

            def run_pad(env: _Env) -> None:
                y = torch.nn.functional.pad(self._plain(env, g, ins[0]), flat, value=value)
                self._set(env, out, y, False)

            return run_pad

        raise UnsupportedOpError(
            op, node.origin or node.name, node.opset, "no GPU kernel for this operator yet"
        )
