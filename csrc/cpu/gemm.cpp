#include "cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include <atomic>
#include <string>

#include "cpu/gemm_micro.h"
#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

using gemm_detail::MicroFn;
using gemm_detail::TileEpilogue;

constexpr int MR = kGemmMR;
constexpr int NR = kGemmNR;
constexpr int KC = kGemmKC;
constexpr int NC = 128;  // columns per task: a KC x NC packed B block is 128 KiB
constexpr int MC = 384;  // rows per A block: MC x KC floats (384 KiB) stay in L2

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// R x 16 register tile: C (+)= A_panel[kc x MR] * B_panel[kc x NR], rows < R untouched; with
// kFused, the tile epilogue is applied in registers.
// kHalf: only the first 8 columns (the tail of a column block with <= 8 columns left).
template <int R, bool kFused, bool kHalf = false>
void micro_kernel(int kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                  int64_t ldc, bool accumulate, const TileEpilogue* ep) {
  // Every accumulator is a chain of dependent FMAs; two FMA units of 4 cycles' latency need 8
  // chains to stay busy. Tiles with fewer (1-3 rows, or 4-6 rows of a half tile: 28-76% of the
  // peak) keep kSets partial sums over interleaved k steps and add them at the end.
  constexpr int kChains = kHalf ? R : 2 * R;
  constexpr int kSets = std::min(4, (8 + kChains - 1) / kChains);
  __m256 part0[kSets][R], part1[kSets][R];
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) part0[s][r] = part1[s][r] = _mm256_setzero_ps();
  auto step = [&](int k, __m256* acc0, __m256* acc1) __attribute__((always_inline)) {
    const __m256 b0 = _mm256_loadu_ps(b + k * NR);
    const __m256 b1 = kHalf ? b0 : _mm256_loadu_ps(b + k * NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + k * MR + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      if (!kHalf) acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  };
  int k = 0;
  if constexpr (kSets > 1) {
    for (; k + kSets <= kc; k += kSets)
#pragma GCC unroll 4
      for (int s = 0; s < kSets; ++s) step(k + s, part0[s], part1[s]);
  }
  for (; k < kc; ++k) step(k, part0[0], part1[0]);
  __m256 acc0[R], acc1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc0[r] = part0[0][r], acc1[r] = part1[0][r];
#pragma GCC unroll 4
    for (int s = 1; s < kSets; ++s) {
      acc0[r] = _mm256_add_ps(acc0[r], part0[s][r]);
      if (!kHalf) acc1[r] = _mm256_add_ps(acc1[r], part1[s][r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    if (accumulate) {
      acc0[r] = _mm256_add_ps(acc0[r], _mm256_loadu_ps(row));
      if (!kHalf) acc1[r] = _mm256_add_ps(acc1[r], _mm256_loadu_ps(row + 8));
    }
    if (kFused) {
      if (ep->row_bias) {
        const __m256 bias = _mm256_broadcast_ss(ep->row_bias + r);
        acc0[r] = _mm256_add_ps(acc0[r], bias);
        acc1[r] = _mm256_add_ps(acc1[r], bias);
      }
      if (ep->col_bias) {
        acc0[r] = _mm256_add_ps(acc0[r], _mm256_loadu_ps(ep->col_bias));
        acc1[r] = _mm256_add_ps(acc1[r], _mm256_loadu_ps(ep->col_bias + 8));
      }
      if (ep->res) {
        const float* rr = ep->res + r * ep->res_rs;
        const __m256 beta = _mm256_set1_ps(ep->beta);
        acc0[r] = _mm256_fmadd_ps(beta, _mm256_loadu_ps(rr), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(beta, _mm256_loadu_ps(rr + 8), acc1[r]);
      }
      if (ep->relu) {
        acc0[r] = simd::relu(acc0[r]);
        acc1[r] = simd::relu(acc1[r]);
      } else if (ep->clip) {
        const __m256 lo = _mm256_set1_ps(ep->lo), hi = _mm256_set1_ps(ep->hi);
        acc0[r] = simd::clip(acc0[r], lo, hi);
        acc1[r] = simd::clip(acc1[r], lo, hi);
      }
    }
    _mm256_storeu_ps(row, acc0[r]);
    if (!kHalf) _mm256_storeu_ps(row + 8, acc1[r]);
  }
}

constexpr MicroFn kMicroHalf[MR + 1] = {
    nullptr, micro_kernel<1, false, true>, micro_kernel<2, false, true>, micro_kernel<3, false, true>,
    micro_kernel<4, false, true>, micro_kernel<5, false, true>, micro_kernel<6, false, true>};
constexpr MicroFn kMicro[MR + 1] = {nullptr,
                                    micro_kernel<1, false>, micro_kernel<2, false>, micro_kernel<3, false>,
                                    micro_kernel<4, false>, micro_kernel<5, false>, micro_kernel<6, false>};
constexpr MicroFn kMicroFused[MR + 1] = {nullptr,
                                         micro_kernel<1, true>, micro_kernel<2, true>, micro_kernel<3, true>,
                                         micro_kernel<4, true>, micro_kernel<5, true>, micro_kernel<6, true>};

// Which micro-kernels run the full-width tiles: AVX-512F where the CPU has it, unless pinned.
enum IsaChoice : int { kIsaAuto = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
std::atomic<int> g_isa_choice{kIsaAuto};

bool use_avx512() {
  const int choice = g_isa_choice.load(std::memory_order_relaxed);
  return choice == kIsaAvx512 || (choice == kIsaAuto && gemm_detail::cpu_has_avx512f());
}

// Whether `ep` can run inside the micro-kernel (the common conv/Gemm epilogues).
bool fusable(const Epilogue& ep) {
  return ep.alpha == 1.0f && (ep.act == Act::None || ep.act == Act::Relu || ep.act == Act::Clip) &&
         (!ep.residual || ep.res_cs == 1);
}

// Packs rows [k0, k0+kc) x cols [n0, n0+nc) of a strided B into panels of kc x NR placed
// `panel_stride` floats apart.
void pack_b_block(const float* b, int64_t rs, int64_t cs, int k0, int kc, int n0, int nc,
                  float* dst, int64_t panel_stride) {
  for (int jp = 0; jp < nc; jp += NR) {
    const int cols = std::min(NR, nc - jp);
    float* panel = dst + int64_t(jp / NR) * panel_stride;
    for (int k = 0; k < kc; ++k) {
      const float* src = b + int64_t(k0 + k) * rs + int64_t(n0 + jp) * cs;
      float* out = panel + k * NR;
      if (cs == 1 && cols == NR) {
        _mm256_storeu_ps(out, _mm256_loadu_ps(src));
        _mm256_storeu_ps(out + 8, _mm256_loadu_ps(src + 8));
      } else {
        int j = 0;
        for (; j < cols; ++j) out[j] = src[j * cs];
        for (; j < NR; ++j) out[j] = 0.0f;
      }
    }
  }
}

// Packs rows [m0, m0+mc) x cols [k0, k0+kc) of a strided A into panels of kc x MR.
void pack_a_block(const float* a, int64_t rs, int64_t cs, int m0, int mc, int k0, int kc,
                  float* dst) {
  for (int ip = 0; ip < mc; ip += MR) {
    const int rows = std::min(MR, mc - ip);
    float* panel = dst + int64_t(ip / MR) * kc * MR;
    for (int k = 0; k < kc; ++k) {
      const float* src = a + int64_t(m0 + ip) * rs + int64_t(k0 + k) * cs;
      float* out = panel + k * MR;
      int r = 0;
      for (; r < rows; ++r) out[r] = src[r * rs];
      for (; r < MR; ++r) out[r] = 0.0f;
    }
  }
}

// Software prefetch of the source of a B block (see BSource), a few lines at a time, run by run.
class SourcePrefetch {
 public:
  void start(const BSource& src) {
    src_ = src;
    outer_at_ = inner_at_ = 0;
    if (!src.first || src.outer <= 0 || src.inner <= 0 || src.run <= 0) {
      src_.outer = 0;  // nothing to fetch
      return;
    }
    begin_run();
  }
  int64_t lines_left() const {
    if (outer_at_ >= src_.outer) return 0;
    return (int64_t(src_.outer - outer_at_) * src_.inner - inner_at_) * lines_per_run_ - line_;
  }
  void issue(int64_t count) {
    for (; count > 0 && outer_at_ < src_.outer; --count) {
      __builtin_prefetch(run_ + int64_t(line_) * 64, 0, 1);
      if (++line_ < lines_per_run_) continue;
      if (++inner_at_ == src_.inner) inner_at_ = 0, ++outer_at_;
      begin_run();
    }
  }

 private:
  void begin_run() {
    const float* first = src_.first + outer_at_ * src_.outer_stride + inner_at_ * src_.inner_stride;
    const uintptr_t a = reinterpret_cast<uintptr_t>(first);
    run_ = reinterpret_cast<const char*>(a & ~uintptr_t(63));
    lines_per_run_ = int((a % 64 + size_t(src_.run) * sizeof(float) + 63) / 64);
    line_ = 0;
  }
  BSource src_;
  const char* run_ = nullptr;
  int outer_at_ = 0, inner_at_ = 0, lines_per_run_ = 0, line_ = 0;
};

// What block (k0, kc, n0, nc) of batch entry `bt` is packed from; empty when unknown.
BSource b_source(const GemmParams& p, int64_t bt, int k0, int kc, int n0, int nc) {
  if (p.b_source_fn) return p.b_source_fn(p.pack_b_ctx, bt, k0, kc, n0, nc);
  BSource src;
  if (p.pack_b_fn || !p.b || p.b_cs != 1) return src;
  src.first = p.b + bt * p.b_bs + int64_t(k0) * p.b_rs + n0;
  src.outer_stride = p.b_rs;
  src.outer = kc;
  src.run = nc;
  return src;
}

struct Blocking {
  int nc;        // columns per task (multiple of NR)
  int mc;        // rows per task (multiple of MR)
  int64_t n_blocks, m_blocks;
};

Blocking choose_blocking(const GemmParams& p, int threads) {
  Blocking bl;
  bl.nc = int(std::min<int64_t>(NC, ceil_div(p.N, NR) * NR));
  bl.n_blocks = ceil_div(p.N, bl.nc);
  const int64_t base = p.batch * bl.n_blocks;
  // Split rows too when there are too few column blocks to keep every thread busy; each row
  // chunk repacks its B block, so keep chunks at least 4 panels tall.
  int64_t want = threads > 1 ? 4 * int64_t(threads) : 1;
  int64_t m_panels = ceil_div(p.M, MR);
  int64_t m_blocks = 1;
  if (base < want) m_blocks = std::min<int64_t>(ceil_div(want, base), std::max<int64_t>(1, m_panels / 4));
  bl.mc = int(ceil_div(m_panels, m_blocks) * MR);
  bl.m_blocks = ceil_div(p.M, bl.mc);
  return bl;
}

}  // namespace

bool gemm_uses_avx512() { return use_avx512(); }
const char* gemm_isa() { return use_avx512() ? "avx512" : "avx2"; }

bool gemm_set_isa(const char* name) {
  const std::string n = name ? name : "";
  if (n == "auto") g_isa_choice = kIsaAuto;
  else if (n == "avx2") g_isa_choice = kIsaAvx2;
  else if (n == "avx512" && gemm_detail::cpu_has_avx512f()) g_isa_choice = kIsaAvx512;
  else return false;
  return true;
}

void apply_act(Act act, float a, float b, float* y, int64_t n) {
  int64_t j = 0;
  switch (act) {
    case Act::None:
      return;
    case Act::Relu:
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, simd::relu(_mm256_loadu_ps(y + j)));
      for (; j < n; ++j) y[j] = simd::relu(y[j]);
      return;
    case Act::Clip: {
      const __m256 lo = _mm256_set1_ps(a), hi = _mm256_set1_ps(b);
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, simd::clip(_mm256_loadu_ps(y + j), lo, hi));
      for (; j < n; ++j) y[j] = simd::clip(y[j], a, b);
      return;
    }
    case Act::LeakyRelu: {
      const __m256 slope = _mm256_set1_ps(a), zero = _mm256_setzero_ps();
      for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(y + j);
        __m256 neg = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);
        _mm256_storeu_ps(y + j, _mm256_blendv_ps(v, _mm256_mul_ps(v, slope), neg));
      }
      for (; j < n; ++j) y[j] = y[j] < 0.0f ? y[j] * a : y[j];
      return;
    }
    case Act::Sigmoid:
      for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, simd::sigmoid(_mm256_loadu_ps(y + j)));
      for (; j < n; ++j) y[j] = simd::sigmoid(y[j]);
      return;
  }
}

void apply_epilogue(const Epilogue& ep, const float* res, int i0, int j0, int m, int n, float* c,
                    int64_t ldc) {
  const __m256 alpha = _mm256_set1_ps(ep.alpha);
  const __m256 beta = _mm256_set1_ps(ep.beta);
  const bool scale = ep.alpha != 1.0f;
  for (int r = 0; r < m; ++r) {
    float* row = c + int64_t(r) * ldc;
    const int i = i0 + r;
    const float* rres = res ? res + int64_t(i) * ep.res_rs + int64_t(j0) * ep.res_cs : nullptr;
    const float row_bias = (ep.bias && ep.bias_per_row) ? ep.bias[i] : 0.0f;
    const float* col_bias = (ep.bias && !ep.bias_per_row) ? ep.bias + j0 : nullptr;
    int j = 0;
    if (ep.res_cs == 1 || !rres) {
      const __m256 rb = _mm256_set1_ps(row_bias);
      for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(row + j);
        if (scale) v = _mm256_mul_ps(v, alpha);
        v = _mm256_add_ps(v, col_bias ? _mm256_loadu_ps(col_bias + j) : rb);
        if (rres) v = _mm256_fmadd_ps(beta, _mm256_loadu_ps(rres + j), v);
        _mm256_storeu_ps(row + j, v);
      }
    }
    for (; j < n; ++j) {
      float v = row[j] * ep.alpha + (col_bias ? col_bias[j] : row_bias);
      if (rres) v += ep.beta * rres[int64_t(j) * ep.res_cs];
      row[j] = v;
    }
    apply_act(ep.act, ep.act_a, ep.act_b, row, n);
  }
}

size_t packed_a_floats(int M, int K) { return size_t(ceil_div(M, MR)) * MR * size_t(K); }
size_t packed_b_floats(int K, int N) { return size_t(ceil_div(N, NR)) * NR * size_t(K); }

void pack_a(const float* a, int64_t rs, int64_t cs, int M, int K, float* out) {
  const int64_t mp = ceil_div(M, MR) * MR;
  for (int k0 = 0; k0 < K; k0 += KC) pack_a_block(a, rs, cs, 0, M, k0, std::min(KC, K - k0), out + mp * k0);
}

void pack_b(const float* b, int64_t rs, int64_t cs, int K, int N, float* out) {
  const int64_t np = ceil_div(N, NR) * NR;
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = std::min(KC, K - k0);
    pack_b_block(b, rs, cs, k0, kc, 0, N, out + np * k0, int64_t(kc) * NR);
  }
}

size_t gemm_workspace_floats(const GemmParams& p, int threads) {
  const Blocking bl = choose_blocking(p, threads);
  if (bl.m_blocks <= 1 || p.b_packed) return 0;
  return size_t(p.batch) * packed_b_floats(p.K, p.N);
}

size_t gemm_scratch_floats(const GemmParams& p, int threads) {
  Blocking bl = choose_blocking(p, threads);
  size_t need = size_t(MR) * NR;  // edge tile
  if (!p.b_packed) need += size_t(KC) * bl.nc;
  if (!p.a_packed) need += size_t(KC) * std::min(bl.mc, MC);
  return need;
}

void run_gemm(const GemmParams& params, Parallel& par) {
  if (params.M <= 0 || params.N <= 0 || params.batch <= 0) return;
  const Blocking bl = choose_blocking(params, par.threads());
  GemmParams prepacked;
  if (bl.m_blocks > 1 && !params.b_packed && params.workspace && params.K > 0) {
    // Pack all of B once, in parallel, instead of once per row block.
    const int64_t per_batch = int64_t(packed_b_floats(params.K, params.N));
    const int64_t n_panels = ceil_div(params.N, NR), k_blocks = ceil_div(params.K, KC);
    auto pack_task = [&](int64_t t, int) {
      const int64_t kb = t % k_blocks, q = (t / k_blocks) % n_panels, bt = t / (k_blocks * n_panels);
      const int k0 = int(kb * KC), kc = std::min(KC, params.K - k0), n0 = int(q * NR);
      const int nc = std::min(NR, params.N - n0);
      float* dst = params.workspace + bt * per_batch + n_panels * NR * k0 + q * int64_t(kc) * NR;
      if (params.pack_b_fn)
        params.pack_b_fn(params.pack_b_ctx, bt, k0, kc, n0, nc, dst, int64_t(kc) * NR);
      else
        pack_b_block(params.b + bt * params.b_bs, params.b_rs, params.b_cs, k0, kc, n0, nc, dst,
                     int64_t(kc) * NR);
    };
    par.run(params.batch * n_panels * k_blocks, pack_task);
    prepacked = params;
    prepacked.b_packed = params.workspace;
    prepacked.b_packed_bs = per_batch;
  }
  const GemmParams& p = prepacked.b_packed ? prepacked : params;
  const bool fused = fusable(p.ep);
  const bool wide = use_avx512();
  const MicroFn* full = wide ? gemm_detail::avx512_micro() : kMicro;
  const MicroFn* full_fused = wide ? gemm_detail::avx512_micro_fused() : kMicroFused;
  const int64_t tasks = p.batch * bl.n_blocks * bl.m_blocks;

  auto task = [&](int64_t t, int thread) {
    const int64_t mb = t % bl.m_blocks;
    const int64_t nb = (t / bl.m_blocks) % bl.n_blocks;
    const int64_t bt = t / (bl.m_blocks * bl.n_blocks);
    const int n0 = int(nb * bl.nc), nc = std::min(bl.nc, p.N - n0);
    const int m0 = int(mb * bl.mc), mc = std::min(bl.mc, p.M - m0);
    float* scratch = par.scratch(thread);
    float* tile = scratch;
    float* bbuf = tile + MR * NR;
    float* abuf = bbuf + (p.b_packed ? 0 : size_t(KC) * bl.nc);
    float* cbase = p.c + bt * p.c_bs;
    const float* res = p.ep.residual ? p.ep.residual + bt * p.ep.res_bs : nullptr;

    if (p.K == 0) {  // empty product: the epilogue alone defines C
      for (int i = 0; i < mc; ++i) std::fill_n(cbase + int64_t(m0 + i) * p.ldc + n0, nc, 0.0f);
      apply_epilogue(p.ep, res, m0, n0, mc, nc, cbase + int64_t(m0) * p.ldc + n0, p.ldc);
      return;
    }
    for (int k0 = 0; k0 < p.K; k0 += KC) {
      const int kc = std::min(KC, p.K - k0);
      const bool accumulate = k0 > 0, last = k0 + kc >= p.K;
      SourcePrefetch next_b;
      if (!p.b_packed) {
        // What the next block packs: the next k block of this task, or the first of task t + 1
        // (a thread claims runs of consecutive tasks). The image is cold in a network, and the
        // copy would stall on it; fetched during this block's tiles, it is in L2 by then.
        if (!last) {
          next_b.start(b_source(p, bt, k0 + kc, std::min(KC, p.K - k0 - kc), n0, nc));
        } else if (t + 1 < tasks && mb + 1 == bl.m_blocks) {
          const int64_t nnb = (nb + 1) % bl.n_blocks, nbt = nnb == 0 ? bt + 1 : bt;
          const int nn0 = int(nnb * bl.nc);
          next_b.start(b_source(p, nbt, 0, std::min(KC, p.K), nn0, std::min(bl.nc, p.N - nn0)));
        }
      }
      // B micro-panels for this block: pointer to the first and the stride between panels.
      const float* bblk;
      int64_t bstride;
      if (p.b_packed) {
        bblk = p.b_packed + bt * p.b_packed_bs + ceil_div(p.N, NR) * NR * k0 + int64_t(n0 / NR) * kc * NR;
        bstride = int64_t(kc) * NR;
      } else {
        if (p.pack_b_fn)
          p.pack_b_fn(p.pack_b_ctx, bt, k0, kc, n0, nc, bbuf, int64_t(kc) * NR);
        else
          pack_b_block(p.b + bt * p.b_bs, p.b_rs, p.b_cs, k0, kc, n0, nc, bbuf, int64_t(kc) * NR);
        bblk = bbuf;
        bstride = int64_t(kc) * NR;
      }
      // Rows in sub-blocks of at most MC so the A block (MC x kc) stays in L2 while the B
      // micro-panels stream past it; the B block is packed once for all sub-blocks.
      for (int ms = 0; ms < mc; ms += MC) {
        const int m1 = m0 + ms, msc = std::min(MC, mc - ms);
        const float* ablk;
        int64_t astride = int64_t(kc) * MR;
        if (p.a_packed) {
          ablk = p.a_packed + bt * p.a_packed_bs + ceil_div(p.M, MR) * MR * k0 + int64_t(m1 / MR) * kc * MR;
        } else {
          pack_a_block(p.a + bt * p.a_bs, p.a_rs, p.a_cs, m1, msc, k0, kc, abuf);
          ablk = abuf;
        }
        // Row panels outer, column panels inner: an A micro-panel stays in L1 while the task's B
        // panels stream from L2, and C (and the residual) are walked in short sequential runs.
        const int n_panels = int(ceil_div(nc, NR)), tile_count = n_panels * int(ceil_div(msc, MR));
        auto corner = [n_panels](int it) { return std::pair<int, int>{it / n_panels * MR, it % n_panels * NR}; };
        const int64_t pf_per_tile = next_b.lines_left() / std::max(1, tile_count) + 1;
        for (int it = 0; it < tile_count; ++it) {
          const auto [ip, jp] = corner(it);
          next_b.issue(pf_per_tile);
          const int cols = std::min(NR, nc - jp);
          const float* bp = bblk + int64_t(jp / NR) * bstride;
          const int rows = std::min(MR, msc - ip);
          const float* ap = ablk + int64_t(ip / MR) * astride;
          const int i0 = m1 + ip, j0 = n0 + jp;
          float* cp = cbase + int64_t(i0) * p.ldc + j0;
          if (it + 1 < tile_count) {
            // The next tile's C rows and residual rows head for the cache while this tile's k
            // loop runs: in a network they are cold, and the tile's stores and epilogue would wait.
            const auto [in, jn] = corner(it + 1);
            const int rn = std::min(MR, msc - in);
            const float* cn = cbase + int64_t(m1 + in) * p.ldc + n0 + jn;
            for (int r = 0; r < rn; ++r) __builtin_prefetch(cn + r * p.ldc, 1, 3);
            if (res && last) {
              const float* rnext = res + int64_t(m1 + in) * p.ep.res_rs + n0 + jn;
              for (int r = 0; r < rn; ++r) __builtin_prefetch(rnext + r * p.ep.res_rs, 0, 3);
            }
          }
          if (cols == NR && last && fused) {
            TileEpilogue te;
            te.row_bias = (p.ep.bias && p.ep.bias_per_row) ? p.ep.bias + i0 : nullptr;
            te.col_bias = (p.ep.bias && !p.ep.bias_per_row) ? p.ep.bias + j0 : nullptr;
            te.res = res ? res + int64_t(i0) * p.ep.res_rs + j0 : nullptr;
            te.res_rs = p.ep.res_rs;
            te.beta = p.ep.beta;
            te.relu = p.ep.act == Act::Relu;
            te.clip = p.ep.act == Act::Clip;
            te.lo = p.ep.act_a, te.hi = p.ep.act_b;
            full_fused[rows](kc, ap, bp, cp, p.ldc, accumulate, &te);
            continue;
          }
          if (cols == NR) {
            full[rows](kc, ap, bp, cp, p.ldc, accumulate, nullptr);
          } else if (wide && cols > 8) {
            gemm_detail::avx512_micro_masked()[rows](kc, ap, bp, cp, p.ldc, accumulate, cols);
          } else {
            // A tail of <= 8 columns takes 8-wide FMAs even where 16-wide ones exist: on Zen 4 a
            // 16-wide FMA costs two 8-wide ones, and tails such as 196 = 12 x 16 + 4 pixels
            // (14x14) or 49 Winograd tiles (28x28) would pay full width for 4 or 1 columns.
            // Measured on those layers: 0.96-0.98x the time.
            if (accumulate)
              for (int r = 0; r < rows; ++r) std::memcpy(tile + r * NR, cp + r * p.ldc, cols * sizeof(float));
            (cols <= 8 ? kMicroHalf : kMicro)[rows](kc, ap, bp, tile, NR, accumulate, nullptr);
            for (int r = 0; r < rows; ++r) std::memcpy(cp + r * p.ldc, tile + r * NR, cols * sizeof(float));
          }
          if (last) apply_epilogue(p.ep, res, i0, j0, rows, cols, cp, p.ldc);
        }
      }
    }
  };
  par.run(tasks, task);
}

}  // namespace cbir::cpu
