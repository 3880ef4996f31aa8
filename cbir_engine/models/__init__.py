"""The seed networks of the survey as torch modules, ready to export to ONNX."""

from cbir_engine.models.zoo import SEED_NETWORKS, ZOO_ADDITIONS, build, randomize_batchnorm

__all__ = ["SEED_NETWORKS", "ZOO_ADDITIONS", "build", "randomize_batchnorm"]
