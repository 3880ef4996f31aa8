// Concat, transpose and pad: pure data movement.
#include <algorithm>
#include <cstring>

#include "cpu/ops.h"

namespace cbir::cpu {

void run_concat(const ConcatParams& p, Parallel& par) {
  int64_t total = 0;
  for (int i = 0; i < p.count; ++i) total += p.chunks[i];
  auto task = [&](int64_t t, int) {
    const int64_t o = t / p.count;
    const int i = int(t % p.count);
    if (!p.inputs[i]) return;  // its producer wrote it in place
    int64_t off = 0;
    for (int k = 0; k < i; ++k) off += p.chunks[k];
    std::memcpy(p.y + o * total + off, p.inputs[i] + o * p.chunks[i], size_t(p.chunks[i]) * sizeof(float));
  };
  par.run(p.outer * p.count, task);
}

void run_transpose(const TransposeParams& p, Parallel& par) {
  const int r = p.rank;
  int64_t xs[kMaxRank], ys_shape[kMaxRank], src_stride[kMaxRank];
  int64_t s = 1;
  for (int d = r - 1; d >= 0; --d) xs[d] = s, s *= p.shape[d];
  for (int d = 0; d < r; ++d) ys_shape[d] = p.shape[p.perm[d]], src_stride[d] = xs[p.perm[d]];
  const int64_t total = s;
  if (total == 0) return;
  const int64_t inner = r ? ys_shape[r - 1] : 1;
  const int64_t rows = total / inner;
  const int64_t in_s = r ? src_stride[r - 1] : 1;
  auto task = [&](int64_t row, int) {
    int64_t off = 0, rem = row;
    for (int d = r - 2; d >= 0; --d) {
      off += (rem % ys_shape[d]) * src_stride[d];
      rem /= ys_shape[d];
    }
    const float* x = p.x + off;
    float* y = p.y + row * inner;
    if (in_s == 1)
      std::memcpy(y, x, size_t(inner) * sizeof(float));
    else
      for (int64_t j = 0; j < inner; ++j) y[j] = x[j * in_s];
  };
  par.run(rows, task);
}

namespace {
// Maps output index o of a padded dim to the input index, or -1 for the fill value. Negative pads
// crop first; the padding then extends the cropped range (so reflect and wrap see only it).
inline int64_t pad_source(PadMode mode, int64_t o, int64_t begin, int64_t end, int64_t n) {
  const int64_t crop_b = begin < 0 ? -begin : 0, crop_e = end < 0 ? -end : 0;
  const int64_t len = n - crop_b - crop_e;
  int64_t i = o - (begin > 0 ? begin : 0);
  if (i >= 0 && i < len) return i + crop_b;
  if (len <= 0) return -1;
  switch (mode) {
    case PadMode::Constant: return -1;
    case PadMode::Edge: return (i < 0 ? 0 : len - 1) + crop_b;
    case PadMode::Reflect:
      if (len == 1) return crop_b;
      for (;;) {  // bounce between the ends until inside
        if (i < 0) i = -i;
        else if (i >= len) i = 2 * (len - 1) - i;
        else return i + crop_b;
      }
    case PadMode::Wrap: return ((i % len) + len) % len + crop_b;
  }
  return -1;
}
}  // namespace

void run_pad(const PadParams& p, Parallel& par) {
  const int r = p.rank;
  int64_t oshape[kMaxRank], xs[kMaxRank];
  int64_t s = 1;
  for (int d = r - 1; d >= 0; --d) {
    oshape[d] = p.shape[d] + p.begin[d] + p.end[d];
    xs[d] = s;
    s *= p.shape[d];
  }
  int64_t rows = 1;
  for (int d = 0; d + 1 < r; ++d) rows *= oshape[d];
  const int64_t inner = r ? oshape[r - 1] : 1;
  if (rows * inner == 0) return;
  const int64_t n_in = r ? p.shape[r - 1] : 1;
  auto task = [&](int64_t row, int) {
    float* y = p.y + row * inner;
    int64_t off = 0, rem = row;
    bool fill = false;
    for (int d = r - 2; d >= 0; --d) {
      const int64_t i = pad_source(p.mode, rem % oshape[d], p.begin[d], p.end[d], p.shape[d]);
      rem /= oshape[d];
      if (i < 0) fill = true;
      else off += i * xs[d];
    }
    if (fill || n_in == 0) {
      std::fill_n(y, inner, p.value);
      return;
    }
    const float* x = p.x + off;
    const int64_t b = r ? p.begin[r - 1] : 0, e = r ? p.end[r - 1] : 0;
    for (int64_t j = 0; j < inner; ++j) {
      const int64_t i = pad_source(p.mode, j, b, e, n_in);
      y[j] = i < 0 ? p.value : x[i];
    }
  };
  par.run(rows, task);
}

}  // namespace cbir::cpu
