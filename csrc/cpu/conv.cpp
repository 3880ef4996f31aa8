#include "cpu/conv.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

constexpr int NR = kGemmNR;

struct ImageCtx {
  const float* x;  // first channel of the group, batch entry 0
  int64_t x_bs;    // floats between batch entries
  int H, W, OW, KH, KW, SH, SW, PT, PL, DH, DW;
};

// Packs im2col rows [k0, k0+kc) (k = (c, ky, kx)) and output pixels [n0, n0+nc).
void pack_image_block(const void* vctx, int64_t batch, int k0, int kc, int n0, int nc, float* dst,
                      int64_t panel_stride) {
  const ImageCtx& g = *static_cast<const ImageCtx*>(vctx);
  const float* x = g.x + batch * g.x_bs;
  const int khw = g.KH * g.KW;
  const int64_t plane = int64_t(g.H) * g.W;
  for (int jp = 0; jp < nc; jp += NR) {
    const int cols = std::min(NR, nc - jp);
    float* panel = dst + int64_t(jp / NR) * panel_stride;
    int iy0[NR], ix0[NR];
    {
      int n = n0 + jp, oy = n / g.OW, ox = n % g.OW;
      for (int j = 0; j < cols; ++j) {
        iy0[j] = oy * g.SH - g.PT;
        ix0[j] = ox * g.SW - g.PL;
        if (++ox == g.OW) ox = 0, ++oy;
      }
    }
    // All columns on one output row with stride 1 or 2: each k row is a (strided) run of x.
    const bool run = (g.SW == 1 || g.SW == 2) && cols == NR && iy0[0] == iy0[cols - 1];
    // Otherwise: the maximal runs of columns that share an output row.
    struct Segment {
      int j0, len, iy, ix;
    };
    Segment seg[NR];
    int nseg = 0;
    if (!run) {
      for (int j = 0; j < cols; ++j) {
        if (nseg && seg[nseg - 1].iy == iy0[j]) {
          ++seg[nseg - 1].len;
        } else {
          seg[nseg++] = Segment{j, 1, iy0[j], ix0[j]};
        }
      }
    }
    int ch = k0 / khw, rem = k0 % khw, ky = rem / g.KW, kx = rem % g.KW;
    for (int k = 0; k < kc; ++k) {
      float* out = panel + int64_t(k) * NR;
      const float* xc = x + ch * plane;
      const int dy = ky * g.DH, dx = kx * g.DW;
      if (run) {
        const int iy = iy0[0] + dy, ix = ix0[0] + dx;
        if (iy < 0 || iy >= g.H) {
          _mm256_storeu_ps(out, _mm256_setzero_ps());
          _mm256_storeu_ps(out + 8, _mm256_setzero_ps());
        } else if (g.SW == 1 && ix >= 0 && ix + NR <= g.W) {
          const float* src = xc + int64_t(iy) * g.W + ix;
          _mm256_storeu_ps(out, _mm256_loadu_ps(src));
          _mm256_storeu_ps(out + 8, _mm256_loadu_ps(src + 8));
        } else if (g.SW == 2 && ix >= 0 && ix + 2 * NR <= g.W) {
          // Even elements of 32 consecutive floats: shuffle pairs, then restore lane order.
          const float* src = xc + int64_t(iy) * g.W + ix;
          for (int h = 0; h < 2; ++h) {
            const __m256 a = _mm256_loadu_ps(src + 16 * h), b = _mm256_loadu_ps(src + 16 * h + 8);
            const __m256 even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
            _mm256_storeu_ps(out + 8 * h, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
          }
        } else {
          const float* src = xc + int64_t(iy) * g.W;
          for (int j = 0; j < NR; ++j) {
            const int xx = ix + j * g.SW;
            out[j] = (xx >= 0 && xx < g.W) ? src[xx] : 0.0f;
          }
        }
      } else {
        // The panel's columns span several output rows: copy each row's segment as a run.
        for (int si = 0; si < nseg; ++si) {
          const Segment& sg = seg[si];
          const int iy = sg.iy + dy, ix = sg.ix + dx;
          float* o = out + sg.j0;
          if (iy < 0 || iy >= g.H) {
            for (int j = 0; j < sg.len; ++j) o[j] = 0.0f;
            continue;
          }
          const float* src = xc + int64_t(iy) * g.W;
          if (ix >= 0 && ix + (sg.len - 1) * g.SW < g.W) {
            if (g.SW == 1)
              for (int j = 0; j < sg.len; ++j) o[j] = src[ix + j];
            else
              for (int j = 0; j < sg.len; ++j) o[j] = src[ix + j * g.SW];
          } else {
            for (int j = 0; j < sg.len; ++j) {
              const int xx = ix + j * g.SW;
              o[j] = (xx >= 0 && xx < g.W) ? src[xx] : 0.0f;
            }
          }
        }
        for (int j = cols; j < NR; ++j) out[j] = 0.0f;
      }
      if (++kx == g.KW) {
        kx = 0;
        if (++ky == g.KH) ky = 0, ++ch;
      }
    }
  }
}

// B of a pointwise conv whose input passes through a channel affine (+ReLU) first: the affine of
// row k (input channel k0 + k) is applied while the row is packed, so the activated input is
// never written out.
struct AffineCtx {
  const float* x;
  int64_t x_bs, plane;
  const float *scale, *shift;
  bool relu;
};

void pack_affine_block(const void* vctx, int64_t batch, int k0, int kc, int n0, int nc, float* dst,
                       int64_t panel_stride) {
  const AffineCtx& g = *static_cast<const AffineCtx*>(vctx);
  const float* x = g.x + batch * g.x_bs;
  for (int jp = 0; jp < nc; jp += NR) {
    const int cols = std::min(NR, nc - jp);
    float* panel = dst + int64_t(jp / NR) * panel_stride;
    for (int k = 0; k < kc; ++k) {
      const float* src = x + int64_t(k0 + k) * g.plane + n0 + jp;
      const float s = g.scale[k0 + k], h = g.shift[k0 + k];
      float* out = panel + int64_t(k) * NR;
      if (cols == NR) {
        const __m256 sv = _mm256_set1_ps(s), hv = _mm256_set1_ps(h);
        __m256 v0 = _mm256_fmadd_ps(_mm256_loadu_ps(src), sv, hv);
        __m256 v1 = _mm256_fmadd_ps(_mm256_loadu_ps(src + 8), sv, hv);
        if (g.relu) v0 = simd::relu(v0), v1 = simd::relu(v1);
        _mm256_storeu_ps(out, v0);
        _mm256_storeu_ps(out + 8, v1);
      } else {
        int j = 0;
        for (; j < cols; ++j) {
          const float v = src[j] * s + h;
          out[j] = g.relu ? simd::relu(v) : v;
        }
        for (; j < NR; ++j) out[j] = 0.0f;
      }
    }
  }
}

// What pack_image_block reads for a block: in each channel of rows [k0, k0+kc), the input rows
// under output pixels [n0, n0+nc), whole (a superset where columns are skipped).
BSource image_source(const void* vctx, int64_t batch, int k0, int kc, int n0, int nc) {
  const ImageCtx& g = *static_cast<const ImageCtx*>(vctx);
  const int khw = g.KH * g.KW;
  const int c_lo = k0 / khw, c_hi = (k0 + kc - 1) / khw;
  const int oy_lo = n0 / g.OW, oy_hi = (n0 + nc - 1) / g.OW;
  // One tap row: every SH-th input row (strided 1x1 convs skip the rest); else the whole span.
  const int step = g.KH == 1 ? g.SH : 1;
  int iy_lo = oy_lo * g.SH - g.PT, iy_hi = oy_hi * g.SH - g.PT + (g.KH - 1) * g.DH;
  while (iy_lo < 0) iy_lo += step;
  iy_hi = std::min(iy_hi, g.H - 1);
  BSource src;
  if (iy_lo > iy_hi) return src;
  const int64_t plane = int64_t(g.H) * g.W;
  src.first = g.x + batch * g.x_bs + c_lo * plane + int64_t(iy_lo) * g.W;
  src.outer_stride = plane;
  src.outer = c_hi - c_lo + 1;
  src.inner_stride = int64_t(step) * g.W;
  src.inner = (iy_hi - iy_lo) / step + 1;
  src.run = g.W;
  return src;
}

// What pack_affine_block reads: rows [k0, k0+kc) of the image, columns [n0, n0+nc).
BSource affine_source(const void* vctx, int64_t batch, int k0, int kc, int n0, int nc) {
  const AffineCtx& g = *static_cast<const AffineCtx*>(vctx);
  BSource src;
  src.first = g.x + batch * g.x_bs + int64_t(k0) * g.plane + n0;
  src.outer_stride = g.plane;
  src.outer = kc;
  src.run = nc;
  return src;
}

GemmParams group_gemm(const Conv2dParams& p, int g, ImageCtx& ctx, AffineCtx& actx) {
  const int Cg = p.C / p.groups, Kg = p.K / p.groups;
  const int64_t out_plane = int64_t(p.OH) * p.OW;
  ctx = ImageCtx{p.x + int64_t(g) * Cg * p.H * p.W,
                 conv_x_batch_stride(p),
                 p.H, p.W, p.OW, p.KH, p.KW, p.SH, p.SW, p.PT, p.PL, p.DH, p.DW};
  GemmParams gp;
  gp.M = Kg;
  gp.N = int(out_plane);
  gp.K = Cg * p.KH * p.KW;
  gp.batch = p.N;
  gp.a_packed = p.w + size_t(g) * packed_a_floats(Kg, gp.K);
  const bool pointwise = p.KH == 1 && p.KW == 1 && p.SH == 1 && p.SW == 1 && p.PT == 0 &&
                         p.PL == 0 && p.OH == p.H && p.OW == p.W;
  if (pointwise && p.in_scale) {
    actx = AffineCtx{ctx.x, ctx.x_bs, int64_t(p.H) * p.W, p.in_scale + g * Cg, p.in_shift + g * Cg, p.in_relu};
    gp.pack_b_fn = pack_affine_block;
    gp.pack_b_ctx = &actx;
    gp.b_source_fn = affine_source;
  } else if (pointwise) {  // 1x1: the image already is the B matrix
    gp.b = ctx.x;
    gp.b_rs = int64_t(p.H) * p.W;
    gp.b_cs = 1;
    gp.b_bs = ctx.x_bs;
  } else {
    gp.pack_b_fn = pack_image_block;
    gp.b_source_fn = image_source;
    gp.pack_b_ctx = &ctx;
  }
  gp.c = p.y + int64_t(g) * Kg * out_plane;
  gp.ldc = out_plane;
  gp.c_bs = conv_y_batch_stride(p);
  gp.ep.bias = p.bias ? p.bias + g * Kg : nullptr;
  gp.ep.bias_per_row = true;
  if (p.residual) {
    gp.ep.residual = p.residual + int64_t(g) * Kg * out_plane;
    gp.ep.res_rs = out_plane;
    gp.ep.res_cs = 1;
    gp.ep.res_bs = int64_t(p.K) * out_plane;
  }
  gp.workspace = p.workspace;
  gp.ep.act = p.act;
  gp.ep.act_a = p.act_a;
  gp.ep.act_b = p.act_b;
  return gp;
}

}  // namespace

size_t conv2d_packed_weight_floats(int K, int Cg, int KH, int KW, int groups) {
  return size_t(groups) * packed_a_floats(K / groups, Cg * KH * KW);
}

void pack_conv2d_weight(const float* w, int K, int Cg, int KH, int KW, int groups, float* out) {
  const int Kg = K / groups, kdim = Cg * KH * KW;
  for (int g = 0; g < groups; ++g)
    pack_a(w + int64_t(g) * Kg * kdim, kdim, 1, Kg, kdim, out + size_t(g) * packed_a_floats(Kg, kdim));
}

size_t conv2d_scratch_floats(const Conv2dParams& p, int threads) {
  ImageCtx ctx;
  AffineCtx actx;
  return gemm_scratch_floats(group_gemm(p, 0, ctx, actx), threads);
}

size_t conv2d_workspace_floats(const Conv2dParams& p, int threads) {
  ImageCtx ctx;
  AffineCtx actx;
  return gemm_workspace_floats(group_gemm(p, 0, ctx, actx), threads);
}

void run_conv2d(const Conv2dParams& p, Parallel& par) {
  for (int g = 0; g < p.groups; ++g) {
    ImageCtx ctx;
    AffineCtx actx;
    GemmParams gp = group_gemm(p, g, ctx, actx);
    run_gemm(gp, par);
  }
}

void run_depthwise_conv2d(const Conv2dParams& p, Parallel& par) {
  const int mult = p.K / p.C;
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  auto task = [&](int64_t t, int) {
    const int64_t n = t / p.K;
    const int k = int(t % p.K);
    const float* x = p.x + (n * p.C + k / mult) * in_plane;
    const float* w = p.w + int64_t(k) * p.KH * p.KW;
    float* y = p.y + t * out_plane;
    const float b = p.bias ? p.bias[k] : 0.0f;
    for (int oy = 0; oy < p.OH; ++oy) {
      float* yr = y + int64_t(oy) * p.OW;
      for (int ox = 0; ox < p.OW; ++ox) yr[ox] = b;
      for (int ky = 0; ky < p.KH; ++ky) {
        const int iy = oy * p.SH - p.PT + ky * p.DH;
        if (iy < 0 || iy >= p.H) continue;
        const float* xr = x + int64_t(iy) * p.W;
        for (int kx = 0; kx < p.KW; ++kx) {
          const float wv = w[ky * p.KW + kx];
          const int off = kx * p.DW - p.PL;
          // Output columns whose input column lies inside the row.
          int lo = off < 0 ? (-off + p.SW - 1) / p.SW : 0;
          int hi = p.W - off > 0 ? std::min(p.OW, (p.W - off + p.SW - 1) / p.SW) : 0;
          if (p.SW == 1) {
            const float* src = xr + off;
            for (int ox = lo; ox < hi; ++ox) yr[ox] += wv * src[ox];
          } else {
            for (int ox = lo; ox < hi; ++ox) yr[ox] += wv * xr[ox * p.SW + off];
          }
        }
      }
    }
    if (p.residual) {
      const float* r = p.residual + t * out_plane;
      for (int64_t i = 0; i < out_plane; ++i) y[i] += r[i];
    }
    apply_act(p.act, p.act_a, p.act_b, y, out_plane);
  };
  par.run(int64_t(p.N) * p.K, task);
}

}  // namespace cbir::cpu
