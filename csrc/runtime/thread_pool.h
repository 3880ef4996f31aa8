// A small fork-join pool: the caller works as thread 0, workers 1..n-1 wait on a condition
// variable between jobs and spin briefly first, since jobs in a network come back to back.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/parallel.h"

namespace cbir::runtime {

class ThreadPool final : public cpu::Parallel {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool() override;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const override { return nthreads_; }
  void run(int64_t n, cpu::TaskFn fn) override;
  float* scratch(int thread) override { return scratch_.get() + size_t(thread) * scratch_stride_; }
  size_t scratch_floats() const override { return scratch_floats_; }
  // Grows every thread's scratch to at least `floats` (never on the hot path: called at build).
  void reserve_scratch(size_t floats);
  // Several executors may share one pool; a caller holds this around a whole network run.
  std::mutex& run_mutex() { return run_mu_; }
  // Workers spin between the jobs of one network run; after it they should sleep at once, or
  // they take cores from whatever the process runs next (torch, ONNX Runtime, Python).
  void rest() { resting_.store(true, std::memory_order_relaxed); }

 private:
  struct AlignedFree {
    void operator()(float* p) const;
  };
  void worker(int id);
  // Claims and runs tasks of the job tagged `tag` until none is left (or another job began);
  // calls fn only for a claimed task, so a stale fn of an ended job is never called.
  void work(int thread, uint64_t tag, cpu::TaskFn* fn, int64_t n);

  int nthreads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::mutex run_mu_;
  std::condition_variable wake_;
  std::condition_variable done_cv_;
  uint64_t generation_ = 0;  // guarded by mu_; bumped per job
  bool stop_ = false;
  // The current job.
  cpu::TaskFn* job_ = nullptr;  // guarded by mu_, with job_n_: the latest job (may have ended)
  int64_t job_n_ = 0;
  std::atomic<uint64_t> next_{0};  // the job's tag (high bits) | the next unclaimed task
  std::atomic<int64_t> done_{0};   // tasks of the current job finished
  std::atomic<uint64_t> published_{0};  // generation visible to spinning workers
  std::atomic<bool> resting_{true};
  // The CPU each thread last ran on (the caller's at index 0), to tell when two of them share
  // one: then a spinning thread holds the CPU the other needs, and yields it instead.
  std::unique_ptr<std::atomic<int>[]> cpu_of_;
  bool shares_cpu_with(int thread, int cpu) const;

  std::unique_ptr<float[], AlignedFree> scratch_;
  size_t scratch_floats_ = 0;
  size_t scratch_stride_ = 0;
};

// Default thread count: the CPUs this process may run on.
int default_threads();

}  // namespace cbir::runtime
