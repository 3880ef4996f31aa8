// Fused retrieval-head kernels: NetVLAD (soft-assignment + residual aggregation + normalisation
// in one pass over each image's feature map), GeM pooling, and sign (hash codes).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/parallel.h"

namespace cbir::cpu {

// y[n] = L2(intra_L2(V)), V[k, d] = sum_i a[k, i] (xn[d, i] - c[k, d]),
// a[:, i] = softmax_k(W xn[:, i] + b), xn = x / max(||x[:, i]||, eps_in) when normalize_input.
// x: [N, D, HW]; W: [K, D]; b: [K]; c: [K, D]; y: [N, K * D].
struct NetVladParams {
  int64_t N = 0, D = 0, HW = 0, K = 0;
  bool normalize_input = true;
  float eps_in = 1e-12f, eps_intra = 1e-12f, eps_out = 1e-12f;
  const float* x = nullptr;
  const float* w = nullptr;
  const float* b = nullptr;
  const float* c = nullptr;
  float* y = nullptr;
};
// Per-thread scratch floats: xn [D * HW], its transpose [HW * D], a [K * HW], norms [HW].
size_t netvlad_scratch_floats(const NetVladParams& p);
void run_netvlad(const NetVladParams& p, Parallel& par);

// y[r] = (mean_i max(x[r, i], eps)^p)^q over rows r of x [rows, inner] (q = 1/p as exported).
struct GemParams {
  int64_t rows = 0, inner = 0;
  float p = 3.0f, q = 1.0f / 3.0f, eps = 1e-6f;
  const float* x = nullptr;
  float* y = nullptr;
};
void run_gem(const GemParams& p, Parallel& par);

// y = sign(x): 1, -1, or 0 (NaN stays NaN), as ONNX Sign.
void run_sign(const float* x, float* y, int64_t n, Parallel& par);

}  // namespace cbir::cpu
