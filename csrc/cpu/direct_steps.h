// The reduction walk the direct conv tiles share (direct_conv.cpp, direct_conv_avx512.cpp): the
// steps [s0, s1) of a tile's reduction, step s being tap s / C and channel s % C, visited as runs
// of channels within one tap. Each file includes this after its target pragma so the walk inlines
// into its tiles with their instruction set; internal linkage keeps the two builds apart.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cbir::cpu::direct_detail {
namespace {

// run(xt, c, end) for each run: channels [c, end) of the tap whose input pixel starts at xt.
template <class Run>
inline __attribute__((always_inline)) void for_each_tap_run(const float* x, const int32_t* taps, int C, int64_t s0,
                                                            int64_t s1, Run&& run) {
  int64_t t = s0 / C;
  int c = int(s0 % C);
  for (int64_t s = s0; s < s1; ++t, c = 0) {
    const int end = int(std::min<int64_t>(C, c + (s1 - s)));
    s += end - c;
    run(x + taps[t], c, end);
  }
}

}  // namespace
}  // namespace cbir::cpu::direct_detail
