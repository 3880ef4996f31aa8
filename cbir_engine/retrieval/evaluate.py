"""Running descriptor and hash models over image sets with the engine, in batches."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir_engine.data.datasets import to_float


def export_any_size(module: Any, example: Any, opset: int = 17) -> bytes:
    """ONNX bytes of an image model whose batch, height and width all stay dynamic (for photo
    sets of mixed sizes; `torch_backend.export_onnx` keeps only the batch dynamic)."""
    import io

    import torch

    buf = io.BytesIO()
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
        )
    return buf.getvalue()


def engine_embed(
    engine: Any, images: np.ndarray, batch_size: int = 500, progress: bool = False
) -> np.ndarray:
    """Outputs of `engine` for uint8 images [n, 28, 28] (normalised with `to_float`), batch by
    batch; the last partial batch is padded to the batch size so the engine specialises once."""
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="embedding", leave=False)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size])
        n = len(x)
        if n < batch_size and len(images) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        out.append(np.asarray(engine(x))[:n])
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return np.concatenate(out)
