// Implicit-GEMM convolution in NHWC with the epilogue fused; see ops.h for the contract.
//
// Per group: C[m, n] = sum_r A[m, r] B[r, n], m = output pixel (n, oh, ow), n = output channel,
// r = (kh, kw, c). A is gathered from the input while the tile is loaded (no im2col buffer): a
// pixel's channels are contiguous in NHWC, so when c/groups is a multiple of 8 every 8 reduction
// steps are one 16-byte load. fp16/bf16 tiles go through WMMA (16x16x16, fp32 accumulators);
// fp32 runs on a 4x4-per-thread FMA tile. The epilogue (bias, residual, activation, conversion)
// runs on the accumulators staged in shared memory, so each output is written once.
#include <mma.h>

#include "cuda/common.cuh"

namespace cbir_cuda {
namespace {

struct ConvGeom {
  int h, w, cg, kg, kh, kw, oh, ow;
  int sh, sw, ph, pw, dh, dw;
  int x_pix, y_pix;  // pixel strides of x and y in elements
  int rows, red;     // GEMM rows (n * oh * ow) and reduction length (kh * kw * cg)
  int act;
  float lo, hi;
};

// Where output pixel m reads tap (0, 0): image offset and top-left input coordinates.
struct RowOrigin {
  int64_t image;  // element offset of the image in x
  int ih0, iw0;
  bool valid;
};

__device__ __forceinline__ RowOrigin row_origin(const ConvGeom& g, int m) {
  RowOrigin o;
  o.valid = m < g.rows;
  const int mm = o.valid ? m : 0;
  const int ow = mm % g.ow;
  const int t = mm / g.ow;
  const int oh = t % g.oh;
  const int nb = t / g.oh;
  o.image = int64_t(nb) * g.h * g.w * g.x_pix;
  o.ih0 = oh * g.sh - g.ph;
  o.iw0 = ow * g.sw - g.pw;
  return o;
}

// Input element for reduction index (tap, c) of a row, 0 outside the image (padding).
template <typename T>
__device__ __forceinline__ const T* tap_pointer(const ConvGeom& g, const T* xg, const RowOrigin& o, int tap) {
  const int ki = tap / g.kw;
  const int kj = tap - ki * g.kw;
  const int ih = o.ih0 + ki * g.dh;
  const int iw = o.iw0 + kj * g.dw;
  if (!o.valid || ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return nullptr;
  return xg + o.image + (int64_t(ih) * g.w + iw) * g.x_pix;
}

// Writes `count` consecutive reduction elements r0 .. r0 + count of one row to dst (scalar loads).
template <typename T>
__device__ __forceinline__ void gather_row(const ConvGeom& g, const T* xg, const RowOrigin& o, int r0, int count,
                                           T* dst, int dst_stride) {
  int tap = r0 / g.cg;
  int c = r0 - tap * g.cg;
  const T* p = r0 < g.red ? tap_pointer(g, xg, o, tap) : nullptr;
  for (int j = 0; j < count; ++j) {
    const bool in = r0 + j < g.red;
    dst[j * dst_stride] = (in && p) ? p[c] : from_float<T>(0.f);
    if (++c == g.cg) {
      c = 0;
      ++tap;
      p = (r0 + j + 1 < g.red) ? tap_pointer(g, xg, o, tap) : nullptr;
    }
  }
}

template <typename T>
__device__ __forceinline__ void epilogue(const ConvGeom& g, int grp, int m, int n, float v, const float* bias,
                                         const T* res, T* y) {
  if (m >= g.rows || n >= g.kg) return;
  const int ch = grp * g.kg + n;
  const int64_t at = int64_t(m) * g.y_pix + ch;
  if (bias) v += bias[ch];
  if (res) v += to_float(res[at]);
  y[at] = from_float<T>(activate(v, g.act, g.lo, g.hi));
}

// ---- tensor cores (fp16 / bf16) ----
constexpr int kBM = 128, kBN = 64, kBK = 32, kThreads = 256;
constexpr int kALd = kBK + 8;  // padded rows: fewer shared-memory bank conflicts, ldm a multiple of 8
constexpr int kBLd = kBN + 8;
constexpr int kCLd = kBN + 4;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) conv_wmma_kernel(ConvGeom g, const T* __restrict__ x,
                                                             const T* __restrict__ w, const float* __restrict__ bias,
                                                             const T* __restrict__ res, T* __restrict__ y) {
  using namespace nvcuda;
  constexpr int kABBytes = (kBM * kALd + kBK * kBLd) * int(sizeof(T));
  constexpr int kCBytes = kBM * kCLd * int(sizeof(float));
  __shared__ __align__(32) unsigned char smem[kABBytes > kCBytes ? kABBytes : kCBytes];
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + kBM * kALd;
  float* cs = reinterpret_cast<float*>(smem);  // reused for the epilogue once the products are done

  const int grp = blockIdx.z;
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;
  const T* xg = x + int64_t(grp) * g.cg;
  const T* wg = w + int64_t(grp) * g.red * g.kg;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 4, wn = warp / 4;  // 4 x 2 warps, 32 x 32 outputs each

  // A loading: 2 threads per row, 16 reduction elements each.
  const int a_row = tid / 2, a_col = (tid % 2) * 16;
  const RowOrigin origin = row_origin(g, m0 + a_row);
  // B loading: 8 threads per row of 64 channels, 8 each.
  const int b_row = tid / 8, b_col = (tid % 8) * 8;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int r0 = 0; r0 < g.red; r0 += kBK) {
    T* a_dst = as + a_row * kALd + a_col;
    if (kVec) {  // c/groups % 8 == 0: 8 reduction steps never cross a tap and are 16-byte aligned
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const int r = r0 + a_col + v * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < g.red) {
          const int tap = r / g.cg;
          const T* p = tap_pointer(g, xg, origin, tap);
          if (p) val = *reinterpret_cast<const uint4*>(p + (r - tap * g.cg));
        }
        *reinterpret_cast<uint4*>(a_dst + v * 8) = val;
      }
    } else {
      gather_row(g, xg, origin, r0 + a_col, 16, a_dst, 1);
    }
    {
      const int r = r0 + b_row;
      const int n = n0 + b_col;
      T* b_dst = bs + b_row * kBLd + b_col;
      if (kVec && (g.kg % 8 == 0)) {
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < g.red && n < g.kg) val = *reinterpret_cast<const uint4*>(wg + int64_t(r) * g.kg + n);
        *reinterpret_cast<uint4*>(b_dst) = val;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          b_dst[j] = (r < g.red && n + j < g.kg) ? wg[int64_t(r) * g.kg + n + j] : from_float<T>(0.f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * kALd + kk, kALd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs + kk * kBLd + wn * 32 + j * 16, kBLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kCLd + wn * 32 + j * 16, acc[i][j], kCLd,
                              wmma::mem_row_major);
  __syncthreads();
  // Consecutive threads take consecutive channels: the stores coalesce.
  for (int i = tid; i < kBM * kBN; i += kThreads) {
    const int r = i / kBN, c = i % kBN;
    epilogue(g, grp, m0 + r, n0 + c, cs[r * kCLd + c], bias, res, y);
  }
}

// ---- fp32 (FMA units; no TF32, so results match an fp32 reference to ~1e-6) ----
constexpr int kFBM = 64, kFBN = 64, kFBK = 16;

__global__ void __launch_bounds__(kThreads) conv_fma_kernel(ConvGeom g, const float* __restrict__ x,
                                                            const float* __restrict__ w,
                                                            const float* __restrict__ bias,
                                                            const float* __restrict__ res, float* __restrict__ y) {
  __shared__ float as[kFBK][kFBM + 4];  // transposed: a column of A is a row here
  __shared__ float bs[kFBK][kFBN + 4];
  const int grp = blockIdx.z;
  const int m0 = blockIdx.x * kFBM;
  const int n0 = blockIdx.y * kFBN;
  const float* xg = x + int64_t(grp) * g.cg;
  const float* wg = w + int64_t(grp) * g.red * g.kg;
  const int tid = threadIdx.x;
  const int a_row = tid / 4, a_col = (tid % 4) * 4;  // 4 threads per row, 4 reduction steps each
  const RowOrigin origin = row_origin(g, m0 + a_row);
  const int b_row = tid / 16, b_col = (tid % 16) * 4;
  const int ty = tid / 16, tx = tid % 16;  // outputs rows ty*4.., channels tx*4..
  float acc[4][4] = {};
  for (int r0 = 0; r0 < g.red; r0 += kFBK) {
    gather_row(g, xg, origin, r0 + a_col, 4, &as[a_col][a_row], kFBM + 4);
    const int r = r0 + b_row;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + b_col + j;
      bs[b_row][b_col + j] = (r < g.red && n < g.kg) ? wg[int64_t(r) * g.kg + n] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kFBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) epilogue(g, grp, m0 + ty * 4 + i, n0 + tx * 4 + j, acc[i][j], bias, res, y);
}

bool conv_desc_ok(const cbir_conv_desc* d) {
  if (!d) return false;
  if (d->n < 1 || d->h < 1 || d->w < 1 || d->c < 1 || d->k < 1 || d->kh < 1 || d->kw < 1 || d->oh < 1 || d->ow < 1)
    return false;
  if (d->groups < 1 || d->c % d->groups || d->k % d->groups || d->groups > 65535) return false;
  if (d->stride_h < 1 || d->stride_w < 1 || d->dil_h < 1 || d->dil_w < 1 || d->pad_h < 0 || d->pad_w < 0)
    return false;
  if (d->act < CBIR_ACT_NONE || d->act > CBIR_ACT_SIGMOID) return false;
  // The output size must be what the geometry gives (pads given at the start; the end padding is implied).
  const int64_t span_h = int64_t(d->dil_h) * (d->kh - 1) + 1, span_w = int64_t(d->dil_w) * (d->kw - 1) + 1;
  if (int64_t(d->oh - 1) * d->stride_h + span_h > int64_t(d->h) + 2 * int64_t(d->pad_h) + d->stride_h) return false;
  if (int64_t(d->ow - 1) * d->stride_w + span_w > int64_t(d->w) + 2 * int64_t(d->pad_w) + d->stride_w) return false;
  // 32-bit indices inside the kernels.
  const int64_t rows = int64_t(d->n) * d->oh * d->ow;
  if (rows >= (int64_t(1) << 31) || int64_t(d->kh) * d->kw * d->c >= (int64_t(1) << 31)) return false;
  if (int64_t(d->n) * d->h * d->w * d->c >= (int64_t(1) << 40)) return false;
  return true;
}

ConvGeom make_geom(const cbir_conv_desc* d) {
  ConvGeom g;
  g.h = d->h, g.w = d->w, g.cg = d->c / d->groups, g.kg = d->k / d->groups, g.kh = d->kh, g.kw = d->kw;
  g.oh = d->oh, g.ow = d->ow, g.sh = d->stride_h, g.sw = d->stride_w, g.ph = d->pad_h, g.pw = d->pad_w;
  g.dh = d->dil_h, g.dw = d->dil_w, g.x_pix = d->c, g.y_pix = d->k;
  g.rows = d->n * d->oh * d->ow, g.red = d->kh * d->kw * g.cg;
  g.act = d->act, g.lo = d->act_lo, g.hi = d->act_hi;
  return g;
}

template <typename T>
int launch_wmma(const ConvGeom& g, int groups, const void* x, const void* w, const float* bias, const void* res,
                void* y, cudaStream_t s) {
  const dim3 grid(ceil_div(g.rows, kBM), ceil_div(g.kg, kBN), groups);
  if (grid.y > 65535) return CBIR_CUDA_EINVAL;
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* rt = static_cast<const T*>(res);
  T* yt = static_cast<T*>(y);
  if (g.cg % 8 == 0)
    conv_wmma_kernel<T, true><<<grid, kThreads, 0, s>>>(g, xt, wt, bias, rt, yt);
  else
    conv_wmma_kernel<T, false><<<grid, kThreads, 0, s>>>(g, xt, wt, bias, rt, yt);
  return last_error();
}

}  // namespace
}  // namespace cbir_cuda

extern "C" int cbir_conv2d_nhwc_cuda(const cbir_conv_desc* desc, int dtype, const void* x, const void* w,
                                     const float* bias, const void* residual, void* y, void* stream) {
  using namespace cbir_cuda;
  if (!conv_desc_ok(desc) || !x || !w || !y) return CBIR_CUDA_EINVAL;
  const ConvGeom g = make_geom(desc);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CBIR_CUDA_F16: return launch_wmma<__half>(g, desc->groups, x, w, bias, residual, y, s);
    case CBIR_CUDA_BF16: return launch_wmma<__nv_bfloat16>(g, desc->groups, x, w, bias, residual, y, s);
    case CBIR_CUDA_F32: {
      const dim3 grid(ceil_div(g.rows, kFBM), ceil_div(g.kg, kFBN), desc->groups);
      if (grid.y > 65535) return CBIR_CUDA_EINVAL;
      conv_fma_kernel<<<grid, kThreads, 0, s>>>(g, static_cast<const float*>(x), static_cast<const float*>(w), bias,
                                                static_cast<const float*>(residual), static_cast<float*>(y));
      return last_error();
    }
    default: return CBIR_CUDA_EINVAL;
  }
}
