#include "runtime/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>

namespace cbir::runtime {

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw ? int(hw) : 1;
}

void ThreadPool::AlignedFree::operator()(float* p) const { std::free(p); }

ThreadPool::ThreadPool(int threads) : nthreads_(threads > 0 ? threads : default_threads()) {
  reserve_scratch(1024);
  for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    ++generation_;
    published_.store(generation_, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::reserve_scratch(size_t floats) {
  std::lock_guard<std::mutex> lock(run_mu_);
  if (floats <= scratch_floats_ && scratch_) return;
  size_t stride = (floats + 15) / 16 * 16;  // keep each thread's block 64-byte aligned
  size_t bytes = stride * sizeof(float) * size_t(nthreads_);
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  scratch_.reset(static_cast<float*>(p));
  scratch_floats_ = floats;
  scratch_stride_ = stride;
}

void ThreadPool::work(int thread) {
  cpu::TaskFn& fn = *job_;
  const int64_t n = job_n_;
  // Guided self-scheduling: claim a run of tasks sized to a share of what is left, so jobs of
  // thousands of tiny tasks (Winograd transforms, packing) do not bounce the counter's cache line
  // between cores for every task, while the last claims stay single tasks for balance.
  const int64_t share = 4 * int64_t(nthreads_);
  int64_t i = next_.load(std::memory_order_relaxed);
  while (i < n) {
    const int64_t take = std::max<int64_t>(1, (n - i) / share);
    if (!next_.compare_exchange_weak(i, i + take, std::memory_order_relaxed)) continue;
    for (const int64_t end = i + take; i < end; ++i) fn(i, thread);
    i = next_.load(std::memory_order_relaxed);
  }
}

void ThreadPool::run(int64_t n, cpu::TaskFn fn) {
  if (n <= 0) return;
  if (nthreads_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_n_ = n;
    next_.store(0, std::memory_order_relaxed);
    active_.store(nthreads_ - 1, std::memory_order_relaxed);
    resting_.store(false, std::memory_order_relaxed);
    ++generation_;
    published_.store(generation_, std::memory_order_release);
  }
  wake_.notify_all();
  work(0);
  // Wait for the workers to finish their last task (they may still hold one).
  for (int spins = 0; active_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins > 20000) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait_for(lock, std::chrono::microseconds(200),
                        [this] { return active_.load(std::memory_order_acquire) == 0; });
    }
  }
  job_ = nullptr;
}

void ThreadPool::worker(int id) {
  uint64_t seen = 0;
  for (;;) {
    // Spin a little: the next layer's job usually arrives within microseconds.
    bool got = false;
    for (int spins = 0; spins < 40000 && !resting_.load(std::memory_order_relaxed); ++spins) {
      if (published_.load(std::memory_order_acquire) != seen) {
        got = true;
        break;
      }
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!got) wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
    }
    work(id);
    if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
  }
}

}  // namespace cbir::runtime
