#include "cpu/peak.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>

namespace cbir::cpu {
namespace {

// 12 independent chains hide the FMA latency on two FMA pipes; returns a value that depends on
// every chain so the compiler keeps them all.
float fma_loop(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  return _mm256_cvtss_f32(s);
}

}  // namespace

double measure_fma_gflops(Parallel& par, double seconds) {
  using clock = std::chrono::steady_clock;
  const int threads = par.threads();
  int64_t iters = 1 << 20;
  std::atomic<float> sink{0.0f};
  for (;;) {
    auto t0 = clock::now();
    auto task = [&](int64_t, int) { sink.store(fma_loop(iters), std::memory_order_relaxed); };
    par.run(threads, task);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (dt >= seconds || iters > (int64_t(1) << 40)) return double(threads) * double(iters) * 12 * 16 / dt / 1e9;
    iters = int64_t(double(iters) * std::max(2.0, 1.2 * seconds / std::max(dt, 1e-6)));
  }
}

}  // namespace cbir::cpu
