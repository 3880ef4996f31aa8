// NetVLAD on NHWC features; see ops.h. Three kernels on one stream:
// 1. assign: one warp per local descriptor x_i; lane l owns clusters l, l + 32, ...; the logits
//    w_k . x_i / s_i + b_k (s_i = max(|x_i|, eps_in) when normalising) and their softmax over the
//    clusters (warp shuffles) go to the workspace with 1 / s_i.
// 2. aggregate: a block per (image, 16 clusters, 128 channels); the block stages the assignments
//    of 32 descriptors in shared memory and each thread accumulates V[k, d] = sum_i a_ik x_id / s_i
//    for its channel, then subtracts c_kd * sum_i a_ik. fp32 throughout: the intra-normalisation
//    scales every row to unit length, so a cluster of small mass would magnify rounding.
// 3. normalize: a block per image: row norms (a warp per row), the global norm, the scaled output.
#include "cuda/common.cuh"

namespace cbir_cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kClustersPerLane = CBIR_NETVLAD_MAX_K / 32;

template <typename T>
__global__ void assign_kernel(cbir_netvlad_desc d, const T* __restrict__ x, const T* __restrict__ w_t,
                              const float* __restrict__ bias, float* __restrict__ a, float* __restrict__ inv) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;  // descriptor (image * hw + i)
  if (row >= int64_t(d.n) * d.hw) return;  // whole warps leave together
  const T* xi = x + row * d.d;
  float logit[kClustersPerLane] = {};
  float sq = 0.f;
  for (int j = 0; j < d.d; ++j) {
    const float xv = to_float(xi[j]);
    sq = fmaf(xv, xv, sq);
#pragma unroll
    for (int c = 0; c < kClustersPerLane; ++c) {
      const int k = lane + 32 * c;
      if (k < d.k) logit[c] = fmaf(xv, to_float(w_t[int64_t(j) * d.k + k]), logit[c]);
    }
  }
  const float s = d.normalize_input ? 1.f / fmaxf(sqrtf(sq), d.eps_in) : 1.f;
  float mx = -INFINITY;
#pragma unroll
  for (int c = 0; c < kClustersPerLane; ++c) {
    const int k = lane + 32 * c;
    if (k < d.k) {
      logit[c] = logit[c] * s + (bias ? bias[k] : 0.f);
      mx = fmaxf(mx, logit[c]);
    }
  }
  for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kClustersPerLane; ++c) {
    const int k = lane + 32 * c;
    logit[c] = k < d.k ? __expf(logit[c] - mx) : 0.f;
    sum += logit[c];
  }
  for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
#pragma unroll
  for (int c = 0; c < kClustersPerLane; ++c) {
    const int k = lane + 32 * c;
    if (k < d.k) a[row * d.k + k] = logit[c] / sum;
  }
  if (lane == 0) inv[row] = s;
}

constexpr int kAggClusters = 16, kAggChannels = 128, kAggPixels = 32;

template <typename T>
__global__ void __launch_bounds__(kAggChannels) aggregate_kernel(cbir_netvlad_desc d, const T* __restrict__ x,
                                                                 const float* __restrict__ a,
                                                                 const float* __restrict__ inv,
                                                                 const float* __restrict__ centroids,
                                                                 float* __restrict__ v) {
  __shared__ float sa[kAggPixels][kAggClusters];
  __shared__ float sinv[kAggPixels];
  const int img = blockIdx.z;
  const int k0 = blockIdx.y * kAggClusters;
  const int ch = blockIdx.x * kAggChannels + threadIdx.x;
  float acc[kAggClusters] = {}, mass[kAggClusters] = {};
  for (int i0 = 0; i0 < d.hw; i0 += kAggPixels) {
    for (int e = threadIdx.x; e < kAggPixels * kAggClusters; e += blockDim.x) {
      const int i = i0 + e / kAggClusters, k = k0 + e % kAggClusters;
      sa[e / kAggClusters][e % kAggClusters] = (i < d.hw && k < d.k) ? a[(int64_t(img) * d.hw + i) * d.k + k] : 0.f;
    }
    if (threadIdx.x < kAggPixels) {
      const int i = i0 + threadIdx.x;
      sinv[threadIdx.x] = i < d.hw ? inv[int64_t(img) * d.hw + i] : 0.f;
    }
    __syncthreads();
    const int count = min(kAggPixels, d.hw - i0);
    for (int p = 0; p < count; ++p) {
      const float xv = ch < d.d ? to_float(x[(int64_t(img) * d.hw + i0 + p) * d.d + ch]) * sinv[p] : 0.f;
#pragma unroll
      for (int c = 0; c < kAggClusters; ++c) {
        acc[c] = fmaf(sa[p][c], xv, acc[c]);
        mass[c] += sa[p][c];
      }
    }
    __syncthreads();
  }
  if (ch >= d.d) return;
#pragma unroll
  for (int c = 0; c < kAggClusters; ++c) {
    const int k = k0 + c;
    if (k < d.k) v[(int64_t(img) * d.k + k) * d.d + ch] = acc[c] - centroids[int64_t(k) * d.d + ch] * mass[c];
  }
}

template <typename T>
__global__ void normalize_kernel(cbir_netvlad_desc d, const float* __restrict__ v, T* __restrict__ y) {
  __shared__ float scale[CBIR_NETVLAD_MAX_K];
  __shared__ float global_scale;
  const int img = blockIdx.x;
  const float* vi = v + int64_t(img) * d.k * d.d;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int k = threadIdx.x / 32; k < d.k; k += warps) {
    float sq = 0.f;
    for (int j = lane; j < d.d; j += 32) sq = fmaf(vi[int64_t(k) * d.d + j], vi[int64_t(k) * d.d + j], sq);
    for (int off = 16; off; off >>= 1) sq += __shfl_xor_sync(kFull, sq, off);
    if (lane == 0) scale[k] = sq;  // squared row norm for now
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int k = 0; k < d.k; ++k) {
      const float intra = 1.f / fmaxf(sqrtf(scale[k]), d.eps_intra);
      total += scale[k] * intra * intra;
      scale[k] = intra;
    }
    global_scale = 1.f / fmaxf(sqrtf(total), d.eps_out);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < int64_t(d.k) * d.d; e += blockDim.x)
    y[int64_t(img) * d.k * d.d + e] = from_float<T>(vi[e] * scale[e / d.d] * global_scale);
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

bool desc_ok(const cbir_netvlad_desc* d) {
  return d && d->n >= 1 && d->hw >= 1 && d->d >= 1 && d->k >= 1 && d->k <= CBIR_NETVLAD_MAX_K &&
         int64_t(d->n) * d->hw * d->d < (int64_t(1) << 40) && d->eps_in >= 0.f && d->eps_intra >= 0.f &&
         d->eps_out >= 0.f && d->n <= 65535;  // gridDim.z of the aggregation
}

template <typename T>
int launch(const cbir_netvlad_desc& d, const void* x, const void* w_t, const float* bias, const float* centroids,
           void* y, char* ws, cudaStream_t s) {
  const int64_t rows = int64_t(d.n) * d.hw;
  float* a = reinterpret_cast<float*>(ws);
  float* inv = reinterpret_cast<float*>(ws + align_up(size_t(rows) * d.k * sizeof(float)));
  float* v = reinterpret_cast<float*>(ws + align_up(size_t(rows) * d.k * sizeof(float)) +
                                      align_up(size_t(rows) * sizeof(float)));
  const T* xt = static_cast<const T*>(x);
  assign_kernel<T><<<ceil_div(rows, 8), 256, 0, s>>>(d, xt, static_cast<const T*>(w_t), bias, a, inv);
  const dim3 agg(ceil_div(d.d, kAggChannels), ceil_div(d.k, kAggClusters), d.n);
  aggregate_kernel<T><<<agg, kAggChannels, 0, s>>>(d, xt, a, inv, centroids, v);
  normalize_kernel<T><<<d.n, 256, 0, s>>>(d, v, static_cast<T*>(y));
  return last_error();
}

}  // namespace
}  // namespace cbir_cuda

extern "C" size_t cbir_netvlad_cuda_workspace(const cbir_netvlad_desc* d) {
  using cbir_cuda::align_up;
  if (!cbir_cuda::desc_ok(d)) return 0;
  const size_t rows = size_t(d->n) * d->hw;
  return align_up(rows * d->k * sizeof(float)) + align_up(rows * sizeof(float)) +
         align_up(size_t(d->n) * d->k * d->d * sizeof(float));
}

extern "C" int cbir_netvlad_nhwc_cuda(const cbir_netvlad_desc* d, int dtype, const void* x, const void* w_t,
                                      const float* bias, const float* centroids, void* y, void* workspace,
                                      size_t workspace_bytes, void* stream) {
  using namespace cbir_cuda;
  if (!desc_ok(d) || !x || !w_t || !centroids || !y || !workspace) return CBIR_CUDA_EINVAL;
  if (workspace_bytes < cbir_netvlad_cuda_workspace(d)) return CBIR_CUDA_EINVAL;
  char* ws = static_cast<char*>(workspace);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CBIR_CUDA_F16: return launch<__half>(*d, x, w_t, bias, centroids, y, ws, s);
    case CBIR_CUDA_BF16: return launch<__nv_bfloat16>(*d, x, w_t, bias, centroids, y, ws, s);
    case CBIR_CUDA_F32: return launch<float>(*d, x, w_t, bias, centroids, y, ws, s);
    default: return CBIR_CUDA_EINVAL;
  }
}
