// Unary and broadcasting binary elementwise kernels, and the per-channel affine map.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task

inline float unary_scalar(Unary op, float v, float a, float b) {
  switch (op) {
    case Unary::Relu: return simd::relu(v);
    case Unary::Sigmoid: return simd::sigmoid(v);
    case Unary::Tanh: return std::tanh(v);
    case Unary::Clip: return simd::clip(v, a, b);
    case Unary::LeakyRelu: return v < 0.0f ? v * a : v;
    case Unary::Sqrt: return std::sqrt(v);
    case Unary::Exp: return std::exp(v);
    case Unary::Log: return std::log(v);
    case Unary::Abs: return std::fabs(v);
    case Unary::Neg: return -v;
    case Unary::Reciprocal: return 1.0f / v;
    case Unary::Identity: return v;
    case Unary::Floor: return std::floor(v);
    case Unary::Ceil: return std::ceil(v);
    case Unary::Softplus: return v > 20.0f ? v : std::log1p(std::exp(v));
    case Unary::Elu: return v < 0.0f ? a * (std::exp(v) - 1.0f) : v;
    case Unary::HardSigmoid: return std::max(0.0f, std::min(1.0f, a * v + b));
    case Unary::Erf: return std::erf(v);
  }
  return v;
}

inline float binary_scalar(Binary op, float x, float z) {
  switch (op) {
    case Binary::Add: return x + z;
    case Binary::Sub: return x - z;
    case Binary::Mul: return x * z;
    case Binary::Div: return x / z;
    case Binary::Pow: return std::pow(x, z);
    case Binary::Max: return (x != x || x > z) ? x : z;  // NaN from either side wins
    case Binary::Min: return (x != x || x < z) ? x : z;
  }
  return x;
}

inline __m256 binary_vec(Binary op, __m256 x, __m256 z) {
  switch (op) {
    case Binary::Add: return _mm256_add_ps(x, z);
    case Binary::Sub: return _mm256_sub_ps(x, z);
    case Binary::Mul: return _mm256_mul_ps(x, z);
    case Binary::Div: return _mm256_div_ps(x, z);
    case Binary::Max: return _mm256_blendv_ps(_mm256_max_ps(x, z), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    case Binary::Min: return _mm256_blendv_ps(_mm256_min_ps(x, z), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    case Binary::Pow: break;
  }
  return x;
}

// One output row: y[j] = a[j*sa] op b[j*sb].
void binary_row(Binary op, int64_t n, const float* a, int64_t sa, const float* b, int64_t sb, float* y) {
  int64_t j = 0;
  if (op != Binary::Pow) {
    if (sa == 1 && sb == 1) {
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, binary_vec(op, _mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)));
    } else if (sa == 1 && sb == 0) {
      const __m256 bv = _mm256_set1_ps(*b);
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, binary_vec(op, _mm256_loadu_ps(a + j), bv));
    } else if (sa == 0 && sb == 1) {
      const __m256 av = _mm256_set1_ps(*a);
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, binary_vec(op, av, _mm256_loadu_ps(b + j)));
    }
  }
  for (; j < n; ++j) y[j] = binary_scalar(op, a[j * sa], b[j * sb]);
}

}  // namespace

void run_unary(const UnaryParams& p, Parallel& par) {
  const int64_t tasks = (p.n + kGrain - 1) / kGrain;
  auto task = [&](int64_t t, int) {
    const int64_t j0 = t * kGrain, len = std::min(kGrain, p.n - j0);
    const float* x = p.x + j0;
    float* y = p.y + j0;
    int64_t j = 0;
    switch (p.op) {
      case Unary::Relu:
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, simd::relu(_mm256_loadu_ps(x + j)));
        break;
      case Unary::Sigmoid:
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, simd::sigmoid(_mm256_loadu_ps(x + j)));
        break;
      case Unary::Clip: {
        const __m256 lo = _mm256_set1_ps(p.a), hi = _mm256_set1_ps(p.b);
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, simd::clip(_mm256_loadu_ps(x + j), lo, hi));
        break;
      }
      case Unary::Exp:
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, simd::exp(_mm256_loadu_ps(x + j)));
        break;
      case Unary::Sqrt:
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, _mm256_sqrt_ps(_mm256_loadu_ps(x + j)));
        break;
      default:
        break;
    }
    for (; j < len; ++j) y[j] = unary_scalar(p.op, x[j], p.a, p.b);
  };
  par.run(tasks, task);
}

void run_binary(const BinaryParams& p, Parallel& par) {
  const int r = p.rank;
  const int64_t inner = r ? p.shape[r - 1] : 1;
  int64_t rows = 1;
  for (int d = 0; d + 1 < r; ++d) rows *= p.shape[d];
  if (rows * inner == 0) return;
  const int64_t sa = r ? p.a_strides[r - 1] : 0, sb = r ? p.b_strides[r - 1] : 0;
  // Tasks of whole rows, or of kGrain-long pieces of a row when rows are long (a same-shape add
  // collapses to one row, which would otherwise run on one thread).
  const int64_t rows_per_task = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  const int64_t pieces = inner > kGrain ? (inner + kGrain - 1) / kGrain : 1;
  const int64_t piece_len = (inner + pieces - 1) / pieces;
  const int64_t tasks = pieces > 1 ? rows * pieces : (rows + rows_per_task - 1) / rows_per_task;
  auto task = [&](int64_t t, int) {
    const int64_t r0 = pieces > 1 ? t / pieces : t * rows_per_task;
    const int64_t r1 = pieces > 1 ? r0 + 1 : std::min(rows, r0 + rows_per_task);
    const int64_t j0 = pieces > 1 ? (t % pieces) * piece_len : 0;
    const int64_t len = std::min(inner - j0, pieces > 1 ? piece_len : inner);
    for (int64_t row = r0; row < r1; ++row) {
      int64_t oa = 0, ob = 0, rem = row;
      for (int d = r - 2; d >= 0; --d) {
        const int64_t i = rem % p.shape[d];
        rem /= p.shape[d];
        oa += i * p.a_strides[d];
        ob += i * p.b_strides[d];
      }
      float* y = p.y + row * inner + j0;
      binary_row(p.op, len, p.a + oa + j0 * sa, sa, p.b + ob + j0 * sb, sb, y);
      if (p.residual) {
        const float* r = p.residual + row * inner + j0;
        int64_t j = 0;
        for (; j + 8 <= len; j += 8) _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(r + j)));
        for (; j < len; ++j) y[j] += r[j];
      }
      apply_act(p.act, p.act_a, p.act_b, y, len);
    }
  };
  par.run(tasks, task);
}

void run_channel_affine(const ChannelAffineParams& p, Parallel& par) {
  auto task = [&](int64_t t, int) {
    const int64_t c = t % p.C;
    const float* x = p.x + t * p.inner;
    float* y = p.y + t * p.inner;
    const float s = p.scale[c], h = p.shift[c];
    const __m256 sv = _mm256_set1_ps(s), hv = _mm256_set1_ps(h);
    int64_t j = 0;
    for (; j + 8 <= p.inner; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), sv, hv));
    for (; j < p.inner; ++j) y[j] = x[j] * s + h;
    apply_act(p.act, p.act_a, p.act_b, y, p.inner);
  };
  par.run(p.N * p.C, task);
}

}  // namespace cbir::cpu
