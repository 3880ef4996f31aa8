"""The on-disk image index: metadata in SQLite beside a code file (Hamming or float), crash-safe,
resumable and incremental; plus image decoding and the model facts an index needs.

    from cbir_engine.store import Collection
    with Collection.create("my.index", "model.onnx") as c:
        c.update("photos/")
    hits = Collection.open("my.index").search_image("query.jpg", k=10)
"""

from cbir_engine.store.collection import (
    Collection,
    CollectionBusyError,
    EvalResult,
    Hit,
    IndexReport,
    Row,
)
from cbir_engine.store.float_index import FloatIndex
from cbir_engine.store.model_info import ModelInfo, read_model_info

__all__ = ["Collection", "CollectionBusyError", "EvalResult", "FloatIndex", "Hit", "IndexReport",
           "ModelInfo", "Row", "read_model_info"]
