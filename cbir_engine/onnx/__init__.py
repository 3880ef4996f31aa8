"""ONNX import: one function per operator, registered by schema version."""

from cbir_engine.onnx import ops as _ops  # noqa: F401  (registers the importers)
from cbir_engine.onnx import ops_retrieval as _ops_retrieval  # noqa: F401  (Sign, fused-head lowerings)
from cbir_engine.onnx.importer import import_model, read_model
from cbir_engine.onnx.registry import REGISTRY, resolve

__all__ = ["REGISTRY", "import_model", "read_model", "resolve"]
