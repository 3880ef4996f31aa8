// The non-GEMM CPU kernels: pooling, LRN, elementwise, reductions, softmax, layout moves.
// Every kernel takes a plain params struct; shapes are in elements, tensors are contiguous
// float32 unless a stride says otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace cbir::cpu {

constexpr int kMaxRank = 8;

// ---- pooling (NCHW) ----
struct Pool2dParams {
  int N = 0, C = 0, H = 0, W = 0, OH = 0, OW = 0;
  int KH = 1, KW = 1, SH = 1, SW = 1, PT = 0, PL = 0, PB = 0, PR = 0, DH = 1, DW = 1;
  bool count_include_pad = false;  // average pooling: divide by the window clipped to the
                                   // padded image (as torch and ONNX do) instead of the image
  const float* x = nullptr;
  float* y = nullptr;
  // Average pooling only: x * in_scale[c] + in_shift[c] (then max(., 0) with in_relu) per input
  // channel, applied to the image as it is read (a pre-activation BatchNorm+ReLU, DenseNet's
  // transitions); the padding stays 0.
  const float* in_scale = nullptr;
  const float* in_shift = nullptr;
  bool in_relu = false;
  // Floats from one image of y to the next; 0: back to back (C*OH*OW). A wider stride writes a
  // channel slice of a larger tensor (a concatenation at batch > 1).
  int64_t y_bs = 0;
};
// Output plane t (= image * C + channel) of a pool.
inline float* pool_out_plane(const Pool2dParams& p, int64_t t) {
  const int64_t plane = int64_t(p.OH) * p.OW;
  return p.y_bs ? p.y + (t / p.C) * p.y_bs + (t % p.C) * plane : p.y + t * plane;
}
void run_maxpool2d(const Pool2dParams& p, Parallel& par);
void run_avgpool2d(const Pool2dParams& p, Parallel& par);
// Per-thread scratch pooling can use (0: none needed).
size_t pool2d_scratch_floats(const Pool2dParams& p);

// Global pooling over `inner` contiguous elements for each of `outer` rows; p-norm for LpPool.
enum class GlobalPool : int32_t { Avg = 0, Max = 1 };
void run_global_pool(GlobalPool kind, int64_t outer, int64_t inner, const float* x, float* y,
                     Parallel& par);

// ---- local response normalisation across channels ----
struct LrnParams {
  int64_t N = 0, C = 0, HW = 0;
  int size = 1;
  float alpha = 1e-4f, beta = 0.75f, bias = 1.0f;
  const float* x = nullptr;
  float* y = nullptr;
};
void run_lrn(const LrnParams& p, Parallel& par);

// ---- elementwise ----
enum class Unary : int32_t {
  Relu = 0, Sigmoid, Tanh, Clip, LeakyRelu, Sqrt, Exp, Log, Abs, Neg, Reciprocal, Identity,
  Floor, Ceil, Softplus, Elu, HardSigmoid, Erf,
};
struct UnaryParams {
  Unary op = Unary::Identity;
  int64_t n = 0;
  float a = 0.0f, b = 0.0f;  // Clip bounds, slopes, ...
  const float* x = nullptr;
  float* y = nullptr;
};
void run_unary(const UnaryParams& p, Parallel& par);

enum class Binary : int32_t { Add = 0, Sub, Mul, Div, Pow, Max, Min };
// y[i] = a[i] op b[i] with numpy broadcasting expressed as strides (0 on broadcast dims).
// `shape` is the output shape; dims are collapsed by the caller where possible.
struct BinaryParams {
  Binary op = Binary::Add;
  int rank = 0;
  int64_t shape[kMaxRank] = {};
  int64_t a_strides[kMaxRank] = {}, b_strides[kMaxRank] = {};
  const float* a = nullptr;
  const float* b = nullptr;
  float* y = nullptr;
  const float* residual = nullptr;  // optional, laid out like y, added before the activation
  Act act = Act::None;  // fused activation (Add+Relu of residual blocks not fused into a conv)
  float act_a = 0.0f, act_b = 0.0f;
};
void run_binary(const BinaryParams& p, Parallel& par);

// y[n, c, :] = x[n, c, :] * scale[c] + shift[c]  (BatchNormalization that could not be folded)
struct ChannelAffineParams {
  int64_t N = 0, C = 0, inner = 0;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* x = nullptr;
  float* y = nullptr;
  Act act = Act::None;
  float act_a = 0.0f, act_b = 0.0f;
};
void run_channel_affine(const ChannelAffineParams& p, Parallel& par);

// ---- reductions ----
enum class Reduce : int32_t { Sum = 0, Mean, Max, Min, L2, L1, SumSquare, Prod };
// Reduces over the dims with reduced[d] set; the output keeps all dims (size 1 where reduced).
struct ReduceParams {
  Reduce op = Reduce::Sum;
  int rank = 0;
  int64_t shape[kMaxRank] = {};
  bool reduced[kMaxRank] = {};
  const float* x = nullptr;
  float* y = nullptr;
};
void run_reduce(const ReduceParams& p, Parallel& par);

// Softmax / LogSoftmax over the middle dim of [outer, axis, inner].
struct SoftmaxParams {
  int64_t outer = 0, axis = 0, inner = 0;
  bool log = false;
  const float* x = nullptr;
  float* y = nullptr;
};
void run_softmax(const SoftmaxParams& p, Parallel& par);

// x / ||x||_p over the middle dim of [outer, axis, inner] (p = 1 or 2).
struct LpNormParams {
  int64_t outer = 0, axis = 0, inner = 0;
  int p = 2;
  const float* x = nullptr;
  float* y = nullptr;
};
void run_lp_normalize(const LpNormParams& p, Parallel& par);

// ---- layout ----
// Concatenation along one axis: each input is [outer, chunk_i] and y is [outer, sum chunk_i].
// A null input is skipped (its producer already wrote its slice of y).
struct ConcatParams {
  int64_t outer = 0;
  int count = 0;
  const float* const* inputs = nullptr;
  const int64_t* chunks = nullptr;
  float* y = nullptr;
};
void run_concat(const ConcatParams& p, Parallel& par);

// y = x permuted: y's dim d is x's dim perm[d].
struct TransposeParams {
  int rank = 0;
  int64_t shape[kMaxRank] = {};  // x's shape
  int perm[kMaxRank] = {};
  const float* x = nullptr;
  float* y = nullptr;
};
void run_transpose(const TransposeParams& p, Parallel& par);

enum class PadMode : int32_t { Constant = 0, Reflect = 1, Edge = 2, Wrap = 3 };
struct PadParams {
  PadMode mode = PadMode::Constant;
  int rank = 0;
  int64_t shape[kMaxRank] = {};                       // x's shape
  int64_t begin[kMaxRank] = {}, end[kMaxRank] = {};   // may be negative (crop)
  float value = 0.0f;
  const float* x = nullptr;
  float* y = nullptr;
};
void run_pad(const PadParams& p, Parallel& par);

}  // namespace cbir::cpu
