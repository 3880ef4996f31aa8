"""The GPU path: CUDA C++ op kernels (csrc/cuda, loaded through their C ABI), the driver-API
launcher for ahead-of-time Triton cubins, and the engine that runs a graph on an NVIDIA GPU
(`cbir_engine.load(path, device="cuda")`)."""
