// Depthwise convolution in NHWC (groups == channels), epilogue fused; see ops.h.
// One thread per output element, channels fastest: a warp reads 32 neighbouring channels of one
// pixel per tap (coalesced), and the [kh][kw][c] weights are read the same way. 1xN and Nx1
// kernels are the general loop with one extent 1.
#include "cuda/common.cuh"

namespace cbir_cuda {
namespace {

struct DwGeom {
  int h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, act;
  float lo, hi;
  int64_t total;
};

template <typename T>
__global__ void depthwise_kernel(DwGeom g, const T* __restrict__ x, const T* __restrict__ w,
                                 const float* __restrict__ bias, const T* __restrict__ res, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.total; i += int64_t(gridDim.x) * blockDim.x) {
    const int ch = int(i % g.c);
    const int64_t p = i / g.c;
    const int ow = int(p % g.ow);
    const int64_t t = p / g.ow;
    const int oh = int(t % g.oh);
    const int64_t nb = t / g.oh;
    const T* img = x + nb * g.h * g.w * g.c + ch;
    float acc = bias ? bias[ch] : 0.f;
    for (int ki = 0; ki < g.kh; ++ki) {
      const int ih = oh * g.sh - g.ph + ki * g.dh;
      if (ih < 0 || ih >= g.h) continue;
      for (int kj = 0; kj < g.kw; ++kj) {
        const int iw = ow * g.sw - g.pw + kj * g.dw;
        if (iw < 0 || iw >= g.w) continue;
        acc = fmaf(to_float(img[(int64_t(ih) * g.w + iw) * g.c]), to_float(w[(ki * g.kw + kj) * g.c + ch]), acc);
      }
    }
    if (res) acc += to_float(res[i]);
    y[i] = from_float<T>(activate(acc, g.act, g.lo, g.hi));
  }
}

template <typename T>
int launch(const DwGeom& g, const void* x, const void* w, const float* bias, const void* res, void* y,
           cudaStream_t s) {
  constexpr int kThreads = 256;
  const int64_t blocks = (g.total + kThreads - 1) / kThreads;
  depthwise_kernel<T><<<int(blocks < 65535 * 32 ? blocks : 65535 * 32), kThreads, 0, s>>>(
      g, static_cast<const T*>(x), static_cast<const T*>(w), bias, static_cast<const T*>(res), static_cast<T*>(y));
  return last_error();
}

}  // namespace
}  // namespace cbir_cuda

extern "C" int cbir_depthwise_nhwc_cuda(const cbir_conv_desc* d, int dtype, const void* x, const void* w,
                                        const float* bias, const void* residual, void* y, void* stream) {
  using namespace cbir_cuda;
  if (!d || !x || !w || !y) return CBIR_CUDA_EINVAL;
  if (d->n < 1 || d->h < 1 || d->w < 1 || d->c < 1 || d->k != d->c || d->groups != d->c || d->kh < 1 ||
      d->kw < 1 || d->oh < 1 || d->ow < 1 || d->stride_h < 1 || d->stride_w < 1 || d->dil_h < 1 || d->dil_w < 1 ||
      d->pad_h < 0 || d->pad_w < 0 || d->act < CBIR_ACT_NONE || d->act > CBIR_ACT_SIGMOID)
    return CBIR_CUDA_EINVAL;
  DwGeom g{d->h,      d->w,      d->c,     d->oh,    d->ow,  d->kh,     d->kw,     d->stride_h, d->stride_w,
           d->pad_h,  d->pad_w,  d->dil_h, d->dil_w, d->act, d->act_lo, d->act_hi, 0};
  g.total = int64_t(d->n) * d->oh * d->ow * d->c;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CBIR_CUDA_F16: return launch<__half>(g, x, w, bias, residual, y, s);
    case CBIR_CUDA_BF16: return launch<__nv_bfloat16>(g, x, w, bias, residual, y, s);
    case CBIR_CUDA_F32: return launch<float>(g, x, w, bias, residual, y, s);
    default: return CBIR_CUDA_EINVAL;
  }
}
