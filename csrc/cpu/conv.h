// 2-D convolution, NCHW float32. General convs run as a GEMM per group whose B operand is packed
// straight from the image (implicit im2col); depthwise convs (one input channel per group) run
// as a direct kernel. Both apply the same fused epilogue (bias, residual add, activation).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace cbir::cpu {

struct Conv2dParams {
  int N = 0, C = 0, H = 0, W = 0;  // input
  int K = 0, OH = 0, OW = 0;       // output channels and size
  int KH = 1, KW = 1, SH = 1, SW = 1, PT = 0, PL = 0, DH = 1, DW = 1;
  int groups = 1;
  const float* x = nullptr;
  const float* w = nullptr;  // pack_conv2d_weight output (GEMM) or raw [K,1,KH,KW] (depthwise)
  const float* bias = nullptr;      // [K] or null
  const float* residual = nullptr;  // [N,K,OH,OW] or null, added before the activation
  float* y = nullptr;
  Act act = Act::None;
  float act_a = 0.0f, act_b = 0.0f;
  float* workspace = nullptr;  // conv2d_workspace_floats() floats, shared by the threads
  // Optional per-input-channel affine (+ReLU) applied to x as it is packed: a pre-activation
  // BatchNorm+ReLU (DenseNet) folded into the 1x1 conv that reads it. Pointwise GEMM path only.
  const float* in_scale = nullptr;
  const float* in_shift = nullptr;
  bool in_relu = false;
  // Floats from one image to the next in x and y; 0: the images lie back to back (C*H*W and
  // K*OH*OW). Wider strides let a conv read and write channel slices of a larger tensor in
  // place (a concatenation at batch > 1). Not the depthwise path, nor with a residual.
  int64_t x_bs = 0, y_bs = 0;
};

inline int64_t conv_x_batch_stride(const Conv2dParams& p) { return p.x_bs ? p.x_bs : int64_t(p.C) * p.H * p.W; }
inline int64_t conv_y_batch_stride(const Conv2dParams& p) { return p.y_bs ? p.y_bs : int64_t(p.K) * p.OH * p.OW; }

// Weights [K, C/groups, KH, KW] -> per-group packed GEMM A operands, back to back.
size_t conv2d_packed_weight_floats(int K, int Cg, int KH, int KW, int groups);
void pack_conv2d_weight(const float* w, int K, int Cg, int KH, int KW, int groups, float* out);

size_t conv2d_scratch_floats(const Conv2dParams& p, int threads);
size_t conv2d_workspace_floats(const Conv2dParams& p, int threads);
void run_conv2d(const Conv2dParams& p, Parallel& par);

// Depthwise: groups == C and K a multiple of C; w is the raw weight.
void run_depthwise_conv2d(const Conv2dParams& p, Parallel& par);

}  // namespace cbir::cpu
