"""The drop-in path for torch users: export a module through torch.onnx.export and load it."""

from __future__ import annotations

import io
from typing import Any

from cbir_engine.runtime import Engine


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


def from_torch(module: Any, example_input: Any, *, opset: int = 17, dynamo: bool = False,
               **load_kwargs: Any) -> Engine:
    from cbir_engine import load

    return load(export_onnx(module, example_input, opset=opset, dynamo=dynamo), **load_kwargs)
