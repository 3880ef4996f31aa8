// Measures what the machine's FMA units deliver, so benchmarks can report achieved GFLOP/s
// against a measured peak rather than a datasheet number.
#pragma once

#include "cpu/parallel.h"

namespace cbir::cpu {

// GFLOP/s of independent 8-wide FMAs on every thread of `par` for about `seconds`.
double measure_fma_gflops(Parallel& par, double seconds);

}  // namespace cbir::cpu
