// CUDA C++ op kernels of the GPU path, NHWC, behind a plain C ABI (callable from the C++
// executor or through ctypes): implicit-GEMM convolution on the tensor cores with the epilogue
// fused (bias from folded BN, residual add, activation), depthwise convolution, max/avg pooling
// and NetVLAD (soft-assignment, aggregation and the three normalisations).
//
// Conventions for every entry point:
// - tensors are device pointers, contiguous, NHWC (activations) in one dtype (cbir_cuda_dtype);
//   biases and NetVLAD centroids are fp32; accumulation is fp32;
// - `stream` is a cudaStream_t (null: the default stream);
// - returns 0, CBIR_CUDA_EINVAL when a descriptor is inconsistent or out of range (checked
//   before any CUDA call, so it can be tested without a GPU), or a cudaError_t value.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

#define CBIR_CUDA_EINVAL (-1)

enum cbir_cuda_dtype { CBIR_CUDA_F16 = 0, CBIR_CUDA_BF16 = 1, CBIR_CUDA_F32 = 2 };

// Fused activation codes; the same numbers as the CPU plan's ACT table.
enum cbir_cuda_act { CBIR_ACT_NONE = 0, CBIR_ACT_RELU = 1, CBIR_ACT_CLIP = 2, CBIR_ACT_LEAKY = 3, CBIR_ACT_SIGMOID = 4 };

typedef struct {
  int n, h, w, c;                 // input [n, h, w, c]
  int k, kh, kw;                  // output channels, kernel height and width
  int oh, ow;                     // output [n, oh, ow, k]
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int groups;                     // c and k divisible by groups
  int act;                        // cbir_cuda_act
  float act_lo, act_hi;           // Clip bounds; act_lo is LeakyRelu's alpha
} cbir_conv_desc;

// y = act(conv(x, w) + bias + residual). w packed [groups][kh][kw][c/groups][k/groups] (the
// implicit GEMM's B, row-major); bias fp32 [k] or null; residual like y or null. The fp16/bf16
// kernels run on the tensor cores (WMMA 16x16x16, fp32 accumulate); fp32 runs on the FMA units.
// 1xN and Nx1 factorized convolutions are this kernel with kh or kw = 1.
int cbir_conv2d_nhwc_cuda(const cbir_conv_desc* desc, int dtype, const void* x, const void* w, const float* bias,
                          const void* residual, void* y, void* stream);

// Depthwise: groups == c == k; w packed [kh][kw][c]. Same epilogue.
int cbir_depthwise_nhwc_cuda(const cbir_conv_desc* desc, int dtype, const void* x, const void* w,
                             const float* bias, const void* residual, void* y, void* stream);

typedef struct {
  int n, h, w, c, oh, ow, kh, kw;
  int stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w;
  int is_max;             // 1: max (padding never wins); 0: average
  int count_include_pad;  // average: divide by the taps inside the padded input, else inside the input
} cbir_pool_desc;

int cbir_pool_nhwc_cuda(const cbir_pool_desc* desc, int dtype, const void* x, void* y, void* stream);

#define CBIR_NETVLAD_MAX_K 256

typedef struct {
  int n, hw, d, k;  // features [n, hw, d] (NHWC flattened), k clusters
  int normalize_input;
  float eps_in, eps_intra, eps_out;
} cbir_netvlad_desc;

// Bytes of device workspace cbir_netvlad_nhwc_cuda needs (assignments, row scales, V).
size_t cbir_netvlad_cuda_workspace(const cbir_netvlad_desc* desc);

// y [n, k * d] (x's dtype) = NetVLAD(x); w_t [d, k] in x's dtype (the 1x1 conv, transposed);
// bias fp32 [k] or null; centroids fp32 [k, d].
int cbir_netvlad_nhwc_cuda(const cbir_netvlad_desc* desc, int dtype, const void* x, const void* w_t,
                           const float* bias, const float* centroids, void* y, void* workspace,
                           size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif
