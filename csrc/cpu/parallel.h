// The one thing CPU kernels know about threading: a way to run numbered tasks in parallel and a
// per-thread scratch area sized by the executor before the first run (so kernels never allocate).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace cbir::cpu {

// A non-owning reference to a callable `void(int64_t task, int thread)`; never allocates.
class TaskFn {
 public:
  template <typename F>
  TaskFn(F& f)  // NOLINT(google-explicit-constructor): lambdas bind implicitly
      : obj_(static_cast<void*>(&f)), call_([](void* o, int64_t task, int thread) {
          (*static_cast<F*>(o))(task, thread);
        }) {}
  void operator()(int64_t task, int thread) const { call_(obj_, task, thread); }

 private:
  void* obj_;
  void (*call_)(void*, int64_t, int);
};

class Parallel {
 public:
  virtual ~Parallel() = default;
  virtual int threads() const = 0;
  // Runs fn(task, thread) for every task in [0, n); returns when all are done. `thread` is in
  // [0, threads()) and no two tasks run at once with the same `thread`.
  virtual void run(int64_t n, TaskFn fn) = 0;
  // Scratch of at least the floats the executor reserved for each thread (64-byte aligned).
  virtual float* scratch(int thread) = 0;
  virtual size_t scratch_floats() const = 0;
};

// Runs everything on the calling thread; for single-threaded use and tests.
class Serial final : public Parallel {
 public:
  Serial(float* scratch, size_t floats) : scratch_(scratch), floats_(floats) {}
  int threads() const override { return 1; }
  void run(int64_t n, TaskFn fn) override {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
  }
  float* scratch(int) override { return scratch_; }
  size_t scratch_floats() const override { return floats_; }

 private:
  float* scratch_;
  size_t floats_;
};

}  // namespace cbir::cpu
