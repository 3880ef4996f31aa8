// Runs a lowered plan: a list of kernel steps over one static arena. Everything is resolved to
// raw pointers when the executor is built, so a run only copies the inputs in, calls the
// kernels in order and copies the outputs out. The executor knows kernels, not graphs or ONNX.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/thread_pool.h"

namespace cbir::runtime {

// Where a tensor lives: in the arena at a byte offset, or in a constant (weights).
struct TensorRef {
  bool present = false;
  bool is_const = false;
  int64_t offset = 0;  // bytes into the arena, or the constant's index
  std::vector<int64_t> shape;
  // Floats from one index of the first dimension to the next; 0: back to back. A channel slice
  // of a concatenation's buffer at batch > 1 (only conv steps take such tensors).
  int64_t batch_stride = 0;
  int64_t numel() const;
  int64_t extent() const;  // floats from the first element to one past the last
};

struct StepSpec {
  std::string kernel;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<TensorRef> tensors;
};

struct ConstantData {
  const float* data;
  int64_t numel;
};

class Step {
 public:
  virtual ~Step() = default;
  virtual void run(cpu::Parallel& par) = 0;
  virtual size_t scratch_floats(int /*threads*/) const { return 0; }
  // A buffer shared by all threads for the duration of the step (steps run one at a time, so
  // they all share one allocation of the largest size asked for).
  virtual size_t workspace_floats(int /*threads*/) const { return 0; }
  virtual void bind_workspace(float* /*ws*/) {}
};

class Executor {
 public:
  // `constants` must outlive the executor (the binding keeps their owners alive).
  Executor(std::shared_ptr<ThreadPool> pool, int64_t arena_bytes, std::vector<ConstantData> constants,
           const std::vector<StepSpec>& steps, std::vector<TensorRef> inputs,
           std::vector<TensorRef> outputs);

  int threads() const { return pool_->threads(); }
  int64_t arena_bytes() const { return arena_bytes_; }
  const std::vector<TensorRef>& inputs() const { return inputs_; }
  const std::vector<TensorRef>& outputs() const { return outputs_; }
  size_t num_steps() const { return steps_.size(); }

  // Caller holds lock() for the whole copy-in, run, copy-out sequence; it also keeps other
  // executors on the same pool out.
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(pool_->run_mutex()); }
  float* tensor_ptr(const TensorRef& t);
  // Runs every step; when `times_ns` is given, records each step's wall time.
  void run_steps(std::vector<int64_t>* times_ns = nullptr);

 private:
  struct HugePageFree {
    void operator()(char* p) const;
  };
  std::shared_ptr<ThreadPool> pool_;
  int64_t arena_bytes_;
  std::unique_ptr<char, HugePageFree> arena_;
  std::unique_ptr<char, HugePageFree> workspace_;
  std::vector<ConstantData> constants_;
  std::vector<std::unique_ptr<Step>> steps_;
  std::vector<TensorRef> inputs_, outputs_;
};

// Names of the kernels a StepSpec may ask for.
std::vector<std::string> kernel_names();

}  // namespace cbir::runtime
