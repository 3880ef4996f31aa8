// Max and average pooling in NHWC; see ops.h. One thread per output element, channels fastest.
#include <cfloat>

#include "cuda/common.cuh"

namespace cbir_cuda {
namespace {

template <typename T>
__global__ void pool_kernel(cbir_pool_desc d, int64_t total, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int ch = int(i % d.c);
    const int64_t p = i / d.c;
    const int ow = int(p % d.ow);
    const int64_t t = p / d.ow;
    const int oh = int(t % d.oh);
    const int64_t nb = t / d.oh;
    const T* img = x + nb * d.h * d.w * d.c + ch;
    float acc = d.is_max ? -FLT_MAX : 0.f;
    bool any = false;
    int count = 0;
    for (int ki = 0; ki < d.kh; ++ki) {
      const int ih = oh * d.stride_h - d.pad_top + ki * d.dil_h;
      for (int kj = 0; kj < d.kw; ++kj) {
        const int iw = ow * d.stride_w - d.pad_left + kj * d.dil_w;
        const bool inside = ih >= 0 && ih < d.h && iw >= 0 && iw < d.w;
        if (inside) {
          const float v = to_float(img[(int64_t(ih) * d.w + iw) * d.c]);
          acc = d.is_max ? fmaxf(acc, v) : acc + v;
          any = true;
        }
        if (d.count_include_pad) {
          count += ih >= -d.pad_top && ih < d.h + d.pad_bottom && iw >= -d.pad_left && iw < d.w + d.pad_right;
        } else {
          count += inside;
        }
      }
    }
    // A window wholly in the padding has no maximum: -inf, as the Triton kernel and torch give.
    const float out = d.is_max ? (any ? acc : -INFINITY) : acc / float(count > 0 ? count : 1);
    y[i] = from_float<T>(out);
  }
}

template <typename T>
int launch(const cbir_pool_desc& d, const void* x, void* y, cudaStream_t s) {
  constexpr int kThreads = 256;
  const int64_t total = int64_t(d.n) * d.oh * d.ow * d.c;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  pool_kernel<T><<<int(blocks < 65535 * 32 ? blocks : 65535 * 32), kThreads, 0, s>>>(
      d, total, static_cast<const T*>(x), static_cast<T*>(y));
  return last_error();
}

}  // namespace
}  // namespace cbir_cuda

extern "C" int cbir_pool_nhwc_cuda(const cbir_pool_desc* d, int dtype, const void* x, void* y, void* stream) {
  using namespace cbir_cuda;
  if (!d || !x || !y) return CBIR_CUDA_EINVAL;
  if (d->n < 1 || d->h < 1 || d->w < 1 || d->c < 1 || d->oh < 1 || d->ow < 1 || d->kh < 1 || d->kw < 1 ||
      d->stride_h < 1 || d->stride_w < 1 || d->dil_h < 1 || d->dil_w < 1 || d->pad_top < 0 || d->pad_left < 0 ||
      d->pad_bottom < 0 || d->pad_right < 0 || (!d->is_max && (d->dil_h != 1 || d->dil_w != 1)))
    return CBIR_CUDA_EINVAL;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CBIR_CUDA_F16: return launch<__half>(*d, x, y, s);
    case CBIR_CUDA_BF16: return launch<__nv_bfloat16>(*d, x, y, s);
    case CBIR_CUDA_F32: return launch<float>(*d, x, y, s);
    default: return CBIR_CUDA_EINVAL;
  }
}
