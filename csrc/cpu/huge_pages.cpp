#include "cpu/huge_pages.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>

namespace cbir::cpu {

void* huge_page_alloc(size_t bytes) {
  constexpr size_t kHuge = size_t(1) << 21;
  const bool huge = bytes >= kHuge;
  const size_t align = huge ? kHuge : 64;
  const size_t rounded = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (!p) throw std::bad_alloc();
  if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without it the buffer still works
  return p;
}

void huge_page_free(void* p) noexcept { std::free(p); }

}  // namespace cbir::cpu
