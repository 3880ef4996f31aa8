// Large buffers on 2 MiB pages where the kernel allows (madvise, a hint): fewer TLB misses when a
// kernel sweeps hundreds of MiB (Hamming tables, a batch's activations), and physically contiguous
// memory, so which L2 sets a buffer lands in no longer changes from one process to the next.
#pragma once

#include <cstddef>

namespace cbir::cpu {

// At least 64-byte aligned; 2 MiB aligned and advised for huge pages from 2 MiB up. Release with
// huge_page_free (it is std::free).
void* huge_page_alloc(size_t bytes);
void huge_page_free(void* p) noexcept;

}  // namespace cbir::cpu
