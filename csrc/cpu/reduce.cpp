// Reductions, softmax and Lp normalisation.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

float reduce_identity(Reduce op) {
  switch (op) {
    case Reduce::Max: return -std::numeric_limits<float>::infinity();
    case Reduce::Min: return std::numeric_limits<float>::infinity();
    case Reduce::Prod: return 1.0f;
    default: return 0.0f;
  }
}

inline float combine(Reduce op, float acc, float v) {
  switch (op) {
    case Reduce::Max: return (v != v || v > acc) ? v : acc;
    case Reduce::Min: return (v != v || v < acc) ? v : acc;
    case Reduce::Prod: return acc * v;
    case Reduce::L2:
    case Reduce::SumSquare: return acc + v * v;
    case Reduce::L1: return acc + std::fabs(v);
    default: return acc + v;
  }
}

// Combines a contiguous run of x into one accumulator.
float reduce_run(Reduce op, const float* x, int64_t n, float acc) {
  int64_t j = 0;
  if (op == Reduce::Sum || op == Reduce::Mean || op == Reduce::L2 || op == Reduce::SumSquare) {
    const bool sq = op == Reduce::L2 || op == Reduce::SumSquare;
    __m256 a = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_loadu_ps(x + j);
      a = sq ? _mm256_fmadd_ps(v, v, a) : _mm256_add_ps(a, v);
    }
    acc += simd::hsum(a);
  }
  for (; j < n; ++j) acc = combine(op, acc, x[j]);
  return acc;
}

}  // namespace

void run_reduce(const ReduceParams& p, Parallel& par) {
  // Collapse neighbouring dims of the same kind; drop size-1 dims.
  int rank = 0;
  int64_t shape[kMaxRank];
  bool red[kMaxRank];
  int64_t total = 1, count = 1;
  for (int d = 0; d < p.rank; ++d) {
    total *= p.shape[d];
    if (p.reduced[d]) count *= p.shape[d];
    if (p.shape[d] == 1) continue;
    if (rank && red[rank - 1] == p.reduced[d]) {
      shape[rank - 1] *= p.shape[d];
    } else {
      shape[rank] = p.shape[d];
      red[rank] = p.reduced[d];
      ++rank;
    }
  }
  int64_t out_size = count ? total / count : 0;
  if (count == 0) {  // reducing an empty axis: the identity (as numpy does)
    for (int64_t i = 0; i < out_size; ++i) p.y[i] = p.op == Reduce::Mean ? NAN : reduce_identity(p.op);
    // An empty non-reduced axis leaves nothing to write; numpy gives NaN for an empty mean.
    return;
  }
  if (total == 0) return;
  // Strides of x and of y (0 on reduced dims).
  int64_t xs[kMaxRank], ys[kMaxRank];
  {
    int64_t sx = 1, sy = 1;
    for (int d = rank - 1; d >= 0; --d) {
      xs[d] = sx;
      sx *= shape[d];
      ys[d] = red[d] ? 0 : sy;
      if (!red[d]) sy *= shape[d];
    }
  }
  const float init = reduce_identity(p.op);
  for (int64_t i = 0; i < out_size; ++i) p.y[i] = init;
  // Tasks split the first kept dim, so no two tasks write the same output.
  int split = -1;
  for (int d = 0; d < rank; ++d)
    if (!red[d]) {
      split = d;
      break;
    }
  const int64_t tasks = split >= 0 ? shape[split] : 1;
  const int64_t inner = rank ? shape[rank - 1] : 1;
  const bool inner_reduced = rank ? red[rank - 1] : true;
  auto task = [&](int64_t t, int) {
    // Iterate all rows (every dim but the last) whose index on `split` is t.
    int64_t idx[kMaxRank] = {};
    if (split >= 0) idx[split] = t;
    for (;;) {
      int64_t ox = 0, oy = 0;
      for (int d = 0; d + 1 < rank; ++d) ox += idx[d] * xs[d], oy += idx[d] * ys[d];
      if (rank && split == rank - 1) ox += t * xs[rank - 1], oy += t * ys[rank - 1];
      const float* x = p.x + ox;
      float* y = p.y + oy;
      if (split == rank - 1 && rank) {
        y[0] = combine(p.op, y[0], x[0]);
      } else if (inner_reduced) {
        y[0] = reduce_run(p.op, x, inner, y[0]);
      } else {
        for (int64_t j = 0; j < inner; ++j) y[j] = combine(p.op, y[j], x[j]);
      }
      // Next row: advance dims rank-2 .. 0, skipping `split`.
      int d = rank - 2;
      for (; d >= 0; --d) {
        if (d == split) continue;
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
      if (d < 0) break;
    }
  };
  par.run(tasks, task);
  if (p.op == Reduce::Mean) {
    const float inv = 1.0f / float(count);
    for (int64_t i = 0; i < out_size; ++i) p.y[i] *= inv;
  } else if (p.op == Reduce::L2) {
    for (int64_t i = 0; i < out_size; ++i) p.y[i] = std::sqrt(p.y[i]);
  }
}

void run_softmax(const SoftmaxParams& p, Parallel& par) {
  auto task = [&](int64_t t, int) {
    const int64_t o = t / p.inner, i = t % p.inner;
    const float* x = p.x + o * p.axis * p.inner + i;
    float* y = p.y + o * p.axis * p.inner + i;
    const int64_t s = p.inner;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t a = 0; a < p.axis; ++a) m = x[a * s] > m ? x[a * s] : m;
    if (std::isinf(m)) m = 0.0f;  // all -inf (or +inf): let the arithmetic give NaN/0 as torch does
    float sum = 0.0f;
    if (s == 1) {
      int64_t a = 0;
      const __m256 mv = _mm256_set1_ps(m);
      __m256 acc = _mm256_setzero_ps();
      for (; a + 8 <= p.axis; a += 8) {
        __m256 e = simd::exp(_mm256_sub_ps(_mm256_loadu_ps(x + a), mv));
        _mm256_storeu_ps(y + a, e);
        acc = _mm256_add_ps(acc, e);
      }
      sum = simd::hsum(acc);
      for (; a < p.axis; ++a) sum += (y[a] = std::exp(x[a] - m));
    } else {
      for (int64_t a = 0; a < p.axis; ++a) sum += (y[a * s] = std::exp(x[a * s] - m));
    }
    if (p.log) {
      const float lse = std::log(sum);
      for (int64_t a = 0; a < p.axis; ++a) y[a * s] = x[a * s] - m - lse;
    } else {
      const float inv = 1.0f / sum;
      for (int64_t a = 0; a < p.axis; ++a) y[a * s] *= inv;
    }
  };
  par.run(p.outer * p.inner, task);
}

void run_lp_normalize(const LpNormParams& p, Parallel& par) {
  auto task = [&](int64_t t, int) {
    const int64_t o = t / p.inner, i = t % p.inner;
    const float* x = p.x + o * p.axis * p.inner + i;
    float* y = p.y + o * p.axis * p.inner + i;
    const int64_t s = p.inner;
    float norm;
    if (s == 1) {
      norm = reduce_run(p.p == 1 ? Reduce::L1 : Reduce::L2, x, p.axis, 0.0f);
    } else {
      norm = 0.0f;
      for (int64_t a = 0; a < p.axis; ++a) norm += p.p == 1 ? std::fabs(x[a * s]) : x[a * s] * x[a * s];
    }
    if (p.p != 1) norm = std::sqrt(norm);
    // A zero vector stays zero (ONNX defines 0/0 = 0 here); NaN in x still propagates.
    const float inv = norm == 0.0f ? 0.0f : 1.0f / norm;
    for (int64_t a = 0; a < p.axis; ++a) y[a * s] = x[a * s] * inv;
  };
  par.run(p.outer * p.inner, task);
}

}  // namespace cbir::cpu
