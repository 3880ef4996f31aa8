"""Running descriptor and hash models over image sets with the engine, in batches."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir_engine.data.datasets import to_float


def engine_embed(engine: Any, images: np.ndarray, batch_size: int = 500, progress: bool = False) -> np.ndarray:
    """Outputs of `engine` for uint8 images [n, 28, 28] (normalised with `to_float`), batch by
    batch; the last partial batch is padded to the batch size so the engine specialises once."""
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc="embedding", leave=False)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size])
        n = len(x)
        if n < batch_size and len(images) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        out.append(np.asarray(engine(x))[:n])
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return np.concatenate(out)
