// Fused retrieval-head kernels. Each image of a NetVLAD batch is one task: the normalised
// descriptors and the soft-assignment live in per-thread scratch, so a feature map is read from
// memory once and nothing [N, K, D]-sized is materialised beside the output.
#include "cpu/netvlad.h"

#include <algorithm>
#include <cmath>

namespace cbir::cpu {

size_t netvlad_scratch_floats(const NetVladParams& p) {
  return size_t(p.D * p.HW + p.K * p.HW + p.HW) + 48;  // + alignment slack
}

namespace {

inline float* align16(float* p) {
  auto u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((u + 63) & ~uintptr_t(63));
}

void netvlad_image(const NetVladParams& p, int64_t n, float* scratch) {
  const int64_t D = p.D, HW = p.HW, K = p.K;
  const float* x = p.x + n * D * HW;
  float* xn = align16(scratch);
  float* a = align16(xn + D * HW);
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
  for (int64_t k = 0; k < K; ++k) {
    float* ak = a + k * HW;
    std::fill(ak, ak + HW, p.b ? p.b[k] : 0.0f);
    const float* wk = p.w + k * D;
    for (int64_t d = 0; d < D; ++d) {
      const float wkd = wk[d];
      const float* xd = xn + d * HW;
      for (int64_t i = 0; i < HW; ++i) ak[i] += wkd * xd[i];
    }
  }
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
  // 3. Residual aggregation V[k, d] = a[k] . xn[d] - c[k, d] * sum_i a[k, i], intra-normalised.
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float* ak = a + k * HW;
    float asum = 0.0f;
    for (int64_t i = 0; i < HW; ++i) asum += ak[i];
    float* yk = y + k * D;
    const float* ck = p.c + k * D;
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float* xd = xn + d * HW;
      float dot = 0.0f;
      for (int64_t i = 0; i < HW; ++i) dot += ak[i] * xd[i];
      const float v = dot - ck[d] * asum;
      yk[d] = v;
      ss += v * v;
    }
    const float norm = std::max(std::sqrt(ss), p.eps_intra);
    float ss2 = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      yk[d] /= norm;
      ss2 += yk[d] * yk[d];
    }
    total += ss2;
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
