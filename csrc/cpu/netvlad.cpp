// Fused retrieval-head kernels. Each image of a NetVLAD batch is one task: the normalised
// descriptors and the soft-assignment live in per-thread scratch, so a feature map is read from
// memory once and nothing [N, K, D]-sized is materialised beside the output.
#include "cpu/netvlad.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace cbir::cpu {

size_t netvlad_scratch_floats(const NetVladParams& p) {
  return size_t(2 * p.D * p.HW + p.K * p.HW + p.HW) + 64;  // + alignment slack
}

namespace {

// C[M, N] += A[M, L] B[L, N], all row-major, for the small products inside one image (L and N
// are tens to hundreds). Register tiles of 4 rows x 16 columns; a masked tile takes the column
// tail, so HW = 49 needs no padding.
inline __m256i tail_mask(int64_t n) {
  alignas(32) static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 8 - n));
}

template <int R>
inline void tile8(int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, int64_t width) {
  const bool full = width == 8;
  const __m256i mask = tail_mask(full ? 8 : width);
  __m256 c[R];
  for (int r = 0; r < R; ++r) c[r] = full ? _mm256_loadu_ps(C + r * ldc) : _mm256_maskload_ps(C + r * ldc, mask);
  for (int64_t l = 0; l < L; ++l) {
    const __m256 b = full ? _mm256_loadu_ps(B + l * ldb) : _mm256_maskload_ps(B + l * ldb, mask);
    for (int r = 0; r < R; ++r) c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + l), b, c[r]);
  }
  for (int r = 0; r < R; ++r) {
    if (full) _mm256_storeu_ps(C + r * ldc, c[r]);
    else _mm256_maskstore_ps(C + r * ldc, mask, c[r]);
  }
}

template <int R>
inline void tile16(int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc) {
  __m256 c0[R], c1[R];
  for (int r = 0; r < R; ++r) c0[r] = _mm256_loadu_ps(C + r * ldc), c1[r] = _mm256_loadu_ps(C + r * ldc + 8);
  for (int64_t l = 0; l < L; ++l) {
    const __m256 b0 = _mm256_loadu_ps(B + l * ldb), b1 = _mm256_loadu_ps(B + l * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + l);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(C + r * ldc, c0[r]), _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
}

template <int R>
void rows(int64_t N, int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) tile16<R>(L, A, lda, B + n, ldb, C + n, ldc);
  for (; n < N; n += 8) tile8<R>(L, A, lda, B + n, ldb, C + n, ldc, std::min<int64_t>(8, N - n));
}

// sum of x[i]^2, vectorised (the plain loop is a serial chain of dependent adds).
float sum_sq(const float* x, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float s = 0.0f;
  for (float v : lanes) s += v;
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

void small_gemm_acc(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows<4>(N, L, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) rows<1>(N, L, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
}

inline float* align16(float* p) {
  auto u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((u + 63) & ~uintptr_t(63));
}

void netvlad_image(const NetVladParams& p, int64_t n, float* scratch) {
  const int64_t D = p.D, HW = p.HW, K = p.K;
  const float* x = p.x + n * D * HW;
  float* xn = align16(scratch);
  float* xt = align16(xn + D * HW);
  float* a = align16(xt + D * HW);
  float* nrm = align16(a + K * HW);
  float* y = p.y + n * K * D;

  // 1. Descriptors, L2-normalised across channels at each position.
  if (p.normalize_input) {
    std::fill(nrm, nrm + HW, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float* xd = x + d * HW;
      for (int64_t i = 0; i < HW; ++i) nrm[i] += xd[i] * xd[i];
    }
    for (int64_t i = 0; i < HW; ++i) nrm[i] = std::max(std::sqrt(nrm[i]), p.eps_in);
    for (int64_t d = 0; d < D; ++d) {
      const float* xd = x + d * HW;
      float* od = xn + d * HW;
      for (int64_t i = 0; i < HW; ++i) od[i] = xd[i] / nrm[i];
    }
  } else {
    std::copy(x, x + D * HW, xn);
  }
  // 2. Assignment logits a[k, i] = b[k] + sum_d w[k, d] xn[d, i], then softmax over k.
  for (int64_t k = 0; k < K; ++k) std::fill(a + k * HW, a + (k + 1) * HW, p.b ? p.b[k] : 0.0f);
  small_gemm_acc(K, HW, D, p.w, D, xn, HW, a, HW);
  std::fill(nrm, nrm + HW, -INFINITY);  // reused: running max, then 1 / sum
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < HW; ++i) nrm[i] = std::max(nrm[i], a[k * HW + i]);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < HW; ++i) a[k * HW + i] = std::exp(a[k * HW + i] - nrm[i]);
  std::fill(nrm, nrm + HW, 0.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < HW; ++i) nrm[i] += a[k * HW + i];
  for (int64_t i = 0; i < HW; ++i) nrm[i] = 1.0f / nrm[i];
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < HW; ++i) a[k * HW + i] *= nrm[i];
  // 3. Residual aggregation V[k, d] = sum_i a[k, i] xn[d, i] - c[k, d] * sum_i a[k, i] (the
  // product against the transposed descriptors), then intra-normalised.
  for (int64_t d0 = 0; d0 < D; d0 += 16) {  // blocked: each write fills a cache line
    const int64_t d1 = std::min(D, d0 + 16);
    for (int64_t i = 0; i < HW; ++i)
      for (int64_t d = d0; d < d1; ++d) xt[i * D + d] = xn[d * HW + i];
  }
  std::fill(y, y + K * D, 0.0f);
  small_gemm_acc(K, D, HW, a, HW, xt, D, y, D);
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float* ak = a + k * HW;
    float* yk = y + k * D;
    float asum = 0.0f;
    for (int64_t i = 0; i < HW; ++i) asum += ak[i];
    const float* ck = p.c + k * D;
    for (int64_t d = 0; d < D; ++d) yk[d] -= ck[d] * asum;
    const float ss = sum_sq(yk, D);
    const float norm = std::max(std::sqrt(ss), p.eps_intra);
    for (int64_t d = 0; d < D; ++d) yk[d] /= norm;
    total += double(ss) / (double(norm) * norm);  // the squared norm of the normalised row
  }
  // 4. Whole-vector L2 normalisation.
  const float norm = std::max(float(std::sqrt(total)), p.eps_out);
  for (int64_t j = 0; j < K * D; ++j) y[j] /= norm;
}

}  // namespace

void run_netvlad(const NetVladParams& p, Parallel& par) {
  auto task = [&](int64_t n, int thread) { netvlad_image(p, n, par.scratch(thread)); };
  par.run(p.N, task);
}

void run_gem(const GemParams& p, Parallel& par) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.inner, 1));
  const int64_t tasks = (p.rows + grain - 1) / grain;
  const bool cube = p.p == 3.0f;  // the common p: three multiplies instead of powf
  auto task = [&](int64_t t, int) {
    const int64_t r1 = std::min(p.rows, (t + 1) * grain);
    for (int64_t r = t * grain; r < r1; ++r) {
      const float* x = p.x + r * p.inner;
      float s = 0.0f;
      if (cube) {
        for (int64_t i = 0; i < p.inner; ++i) {
          const float v = std::max(x[i], p.eps);
          s += v * v * v;
        }
      } else {
        for (int64_t i = 0; i < p.inner; ++i) s += std::pow(std::max(x[i], p.eps), p.p);
      }
      p.y[r] = std::pow(s / float(p.inner), p.q);
    }
  };
  par.run(tasks, task);
}

void run_sign(const float* x, float* y, int64_t n, Parallel& par) {
  constexpr int64_t kGrain = 16384;
  auto task = [&](int64_t t, int) {
    const int64_t i1 = std::min(n, (t + 1) * kGrain);
    for (int64_t i = t * kGrain; i < i1; ++i) {
      const float v = x[i];
      y[i] = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : v);  // keeps 0, -0 and NaN
    }
  };
  par.run((n + kGrain - 1) / kGrain, task);
}

}  // namespace cbir::cpu
