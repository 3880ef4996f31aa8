// Direct convolution with output channels in the vector lanes: the micro-kernel keeps a tile of
// 16 output channels x up to 6 output pixels of one row in registers and, for every input channel
// and tap, broadcasts the 6 input pixels and multiplies them by one packed 16-wide weight row.
// The input is read where it lies (stride and dilation are just address steps), so strided convs
// need no im2col copy and a row of any width costs no padded columns, which is where the GEMM
// path loses: stride-2 convs and planes such as 7x7 whose pixel count is not a multiple of 16.
// The input is first copied to NHWC (zero-padded) in the workspace, so that each pixel's channels
// are one sequential stream for the broadcasts.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/conv.h"

namespace cbir::cpu {

constexpr int kDirectCoutBlock = 16;
constexpr int kDirectMaxPixels = 6;  // pixels of one register tile

// Weights [K, C, KH, KW] -> [ceil(K / 16)][C][KH][KW][16], output channels past K zero.
size_t direct_conv_packed_weight_floats(int K, int C, int KH, int KW);
void pack_direct_conv_weight(const float* w, int K, int C, int KH, int KW, float* out);

// Floats of the zero-padded input copy (0 when the conv reads no padding).
size_t direct_conv_workspace_floats(const Conv2dParams& p);
// groups == 1; p.w from pack_direct_conv_weight; no input affine.
void run_direct_conv2d(const Conv2dParams& p, float* workspace, Parallel& par);

namespace direct_detail {
// One tile with AVX-512F (direct_conv_avx512.cpp): sums of `mr` pixels x 16 output channels over
// the reduction steps [s0, s1), as the AVX2 tile in direct_conv.cpp. Only where the CPU has it.
void run_tile_avx512(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
                     int64_t s0, int64_t s1, bool accumulate, float out[kDirectMaxPixels][kDirectCoutBlock]);
// The same for two blocks of 16 output channels, `wnext` floats apart in the packed weights.
void run_tile2_avx512(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
                      int64_t wnext, int64_t s0, int64_t s1, bool accumulate,
                      float out[kDirectMaxPixels][kDirectCoutBlock], float out2[kDirectMaxPixels][kDirectCoutBlock]);
}  // namespace direct_detail

}  // namespace cbir::cpu
