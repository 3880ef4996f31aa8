// What a kernel step's builder sees: the step's arguments, read in order with bounds checks, and
// a registry that maps kernel names to builders. A file that adds kernels registers them with a
// static KernelRegistrar, so the executor needs no edit for a new kernel.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "runtime/executor.h"

namespace cbir::runtime {

// Reads a step's integer and float arguments in order, refusing to read past the end.
class Args {
 public:
  Args(const StepSpec& s, Executor& ex) : s_(s), ex_(ex) {}
  int64_t i() {
    if (ii_ >= s_.ints.size()) fail("too few integer arguments");
    return s_.ints[ii_++];
  }
  int i32() { return int(i()); }
  // Whether an integer argument is left (optional trailing arguments of older plan files).
  bool has_int() const { return ii_ < s_.ints.size(); }
  float f() {
    if (fi_ >= s_.floats.size()) fail("too few float arguments");
    return float(s_.floats[fi_++]);
  }
  const TensorRef& t(size_t k) const {
    if (k >= s_.tensors.size()) fail("too few tensors");
    return s_.tensors[k];
  }
  size_t tensors() const { return s_.tensors.size(); }
  // Pointer of tensor k, or null when it is absent.
  float* p(size_t k) { return t(k).present ? ex_.tensor_ptr(t(k)) : nullptr; }
  float* need(size_t k) {
    if (!t(k).present) fail("tensor " + std::to_string(k) + " missing");
    return ex_.tensor_ptr(t(k));
  }
  const std::vector<int64_t>& shape(size_t k) const { return t(k).shape; }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("step '" + s_.kernel + "': " + what);
  }

 private:
  const StepSpec& s_;
  Executor& ex_;
  size_t ii_ = 0, fi_ = 0;
};

inline void read_dims(Args& a, int rank, int64_t* out) {
  if (rank < 0 || rank > cpu::kMaxRank) a.fail("rank out of range");
  for (int d = 0; d < rank; ++d) out[d] = a.i();
}

template <typename P, void (*Fn)(const P&, cpu::Parallel&)>
class SimpleStep final : public Step {
 public:
  explicit SimpleStep(const P& p) : p_(p) {}
  void run(cpu::Parallel& par) override { Fn(p_, par); }

 private:
  P p_;
};
template <typename P, void (*Fn)(const P&, cpu::Parallel&)>
std::unique_ptr<Step> simple(const P& p) {
  return std::make_unique<SimpleStep<P, Fn>>(p);
}

using Builder = std::function<std::unique_ptr<Step>(Args&)>;

// Name -> builder of every kernel linked into the module.
std::map<std::string, Builder>& kernel_registry();

struct KernelRegistrar {
  KernelRegistrar(const char* name, Builder builder);
};

}  // namespace cbir::runtime
