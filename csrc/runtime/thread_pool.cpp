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
  cpu_of_.reset(new std::atomic<int>[size_t(nthreads_)]);
  for (int i = 0; i < nthreads_; ++i) cpu_of_[size_t(i)].store(-1, std::memory_order_relaxed);
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

namespace {
// The task counter carries the job's tag in its top bits, so a worker that wakes late, after its
// job ended (or another began), fails to claim anything instead of running another job's tasks.
constexpr int kIndexBits = 40;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
}  // namespace

// Whether a thread other than `thread` last ran on `cpu`: it cannot be running now (this thread
// is), so it waits for this CPU, and spinning here only delays it. This happens when another
// process takes the other cores (measured: a woken worker queued 4 ms behind a spinning caller).
bool ThreadPool::shares_cpu_with(int thread, int cpu) const {
  if (cpu < 0) return false;  // sched_getcpu failed; -1 also marks threads that never ran
  for (int i = 0; i < nthreads_; ++i)
    if (i != thread && cpu_of_[size_t(i)].load(std::memory_order_relaxed) == cpu) return true;
  return false;
}

void ThreadPool::work(int thread, uint64_t tag, cpu::TaskFn* fn, int64_t n) {
  cpu_of_[size_t(thread)].store(sched_getcpu(), std::memory_order_relaxed);
  // Guided self-scheduling: claim a run of tasks sized to a share of what is left, so jobs of
  // thousands of tiny tasks (Winograd transforms, packing) do not bounce the counter's cache line
  // between cores for every task, while the last claims stay single tasks for balance.
  const int64_t share = 4 * int64_t(nthreads_);
  uint64_t cur = next_.load(std::memory_order_acquire);
  while ((cur & ~kIndexMask) == tag) {
    int64_t i = int64_t(cur & kIndexMask);
    if (i >= n) break;
    const int64_t take = std::max<int64_t>(1, (n - i) / share);
    if (!next_.compare_exchange_weak(cur, cur + uint64_t(take), std::memory_order_acq_rel,
                                     std::memory_order_acquire))
      continue;
    for (const int64_t end = i + take; i < end; ++i) (*fn)(i, thread);
    if (done_.fetch_add(take, std::memory_order_acq_rel) + take == n && thread != 0) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
    cur = next_.load(std::memory_order_acquire);
  }
}

void ThreadPool::run(int64_t n, cpu::TaskFn fn) {
  if (n <= 0) return;
  if (nthreads_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  if (uint64_t(n) > kIndexMask) throw std::length_error("thread pool: too many tasks in one job");
  uint64_t tag;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_n_ = n;
    ++generation_;
    tag = (generation_ << kIndexBits);  // the generation's low bits; wraps harmlessly
    done_.store(0, std::memory_order_relaxed);
    next_.store(tag, std::memory_order_release);
    resting_.store(false, std::memory_order_relaxed);
    published_.store(generation_, std::memory_order_release);
  }
  wake_.notify_all();
  work(0, tag, &fn, n);
  // Wait only for tasks that workers claimed and still run. A worker still waking up (a sleeping
  // vCPU can take a millisecond) is not waited for: it will find nothing left to claim.
  for (int spins = 0; done_.load(std::memory_order_acquire) != n; ++spins) {
    if ((spins & 63) == 63 && shares_cpu_with(0, sched_getcpu())) sched_yield();
    if (spins > 20000) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait_for(lock, std::chrono::microseconds(200),
                        [&] { return done_.load(std::memory_order_acquire) == n; });
    }
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  // job_ keeps pointing at `fn` after this returns: a worker that reads it late holds the old tag
  // and never calls it (the counter says the job has no task left, or belongs to a newer job).
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
      if ((spins & 63) == 63) {
        const int cpu = sched_getcpu();
        cpu_of_[size_t(id)].store(cpu, std::memory_order_relaxed);
        if (shares_cpu_with(id, cpu)) sched_yield();
      }
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    cpu::TaskFn* fn;
    int64_t n;
    uint64_t tag;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!got) wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      fn = job_, n = job_n_, tag = generation_ << kIndexBits;
    }
    if (fn) work(id, tag, fn, n);
  }
}

}  // namespace cbir::runtime
