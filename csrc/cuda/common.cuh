// Device helpers shared by the op kernels: dtype conversion, the fused activation, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops.h"

namespace cbir_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float activate(float v, int act, float lo, float hi) {
  switch (act) {
    case CBIR_ACT_RELU: return fmaxf(v, 0.f);
    case CBIR_ACT_CLIP: return fminf(fmaxf(v, lo), hi);
    case CBIR_ACT_LEAKY: return v >= 0.f ? v : v * lo;
    case CBIR_ACT_SIGMOID: return 1.f / (1.f + __expf(-v));
    default: return v;
  }
}

inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Launch errors surface here (invalid configuration, no device, ...), not at the next sync.
inline int last_error() { return int(cudaGetLastError()); }

}  // namespace cbir_cuda
