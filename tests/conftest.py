from __future__ import annotations

import os

# The suite runs on 2-core machines: keep torch and ONNX Runtime from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
