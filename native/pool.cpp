// A thread pool whose caller never waits for a helper that has not started.
//
// A decode step runs ~120 parallel regions of 20-500 us. With OpenMP (at::parallel_for) every
// region ends in a barrier that waits for each thread of the team, and when another process
// holds a core, a descheduled worker stalls the region for a whole scheduler slice: measured on
// 2 busy cores, 1-2 tokens/s on two threads against 40 on one. Here a job is a count of chunks
// that the caller and the helpers claim one at a time from one atomic word; the caller works
// through the chunks itself and waits only for chunks a helper has claimed and not finished.
// A helper that is asleep or descheduled claims nothing, so the worst case is one thread's speed.
//
// The job word packs the generation (24 bits), the chunk count (20) and the next chunk (20): a
// helper claims with a compare-and-swap on the whole word, which fails once the caller has
// moved on to another job, so a late helper can never run a chunk of the wrong job. Helpers
// spin briefly between jobs (decode regions come back to back), then sleep on the word (futex).
// One caller at a time: a second thread that calls while a job runs (or any thread with torch
// set to one thread) runs its chunks itself.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "runner.h"

namespace {

constexpr int GEN_SHIFT = 40, TOTAL_SHIFT = 20;
constexpr uint64_t FIELD = (uint64_t(1) << 20) - 1;

class Pool {
 public:
  // Run fn(0) .. fn(n - 1) on the caller and up to `helpers` helper threads.
  void run(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> one_caller(busy_, std::try_to_lock);
    if (helpers <= 0 || n <= 1 || !one_caller.owns_lock()) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    TORCH_CHECK(static_cast<uint64_t>(n) <= FIELD, "too many chunks: ", n);
    while (static_cast<int>(threads_.size()) < helpers) {
      const int idx = static_cast<int>(threads_.size());
      threads_.emplace_back([this, idx] { helper(idx); });
    }
    fn_ = &fn;
    active_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    // a new generation at chunk 0: publishes fn_ and active_ to the helpers (release)
    const uint64_t gen = ((word_.load(std::memory_order_relaxed) >> GEN_SHIFT) + 1) & 0xffffff;
    const uint64_t start = gen << GEN_SHIFT | static_cast<uint64_t>(n) << TOTAL_SHIFT;
    word_.store(start, std::memory_order_release);
    word_.notify_all();
    int64_t mine = 0;
    for (int64_t c; (c = claim(start)) >= 0; ++mine) fn(c);
    // every chunk is claimed: wait for the ones helpers are still running
    while (done_.load(std::memory_order_acquire) + mine < n) std::this_thread::yield();
  }

 private:
  // the next chunk of the job that started as `start`, or -1 when it has none left or ended
  int64_t claim(uint64_t start) {
    const uint64_t job = start >> TOTAL_SHIFT;  // generation and chunk count
    uint64_t w = word_.load(std::memory_order_acquire);
    while ((w >> TOTAL_SHIFT) == job && (w & FIELD) < (job & FIELD)) {
      if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) {
        return static_cast<int64_t>(w & FIELD);
      }
    }
    return -1;
  }

  void helper(int idx) {
    uint64_t seen = word_.load(std::memory_order_acquire) >> GEN_SHIFT;
    for (;;) {
      // wait for a new generation: spin ~50 us, then sleep on the word
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      uint64_t w = word_.load(std::memory_order_acquire);
      while ((w >> GEN_SHIFT) == seen && std::chrono::steady_clock::now() < until) {
        w = word_.load(std::memory_order_acquire);
      }
      while ((w >> GEN_SHIFT) == seen) {
        word_.wait(w, std::memory_order_acquire);
        w = word_.load(std::memory_order_acquire);
      }
      seen = w >> GEN_SHIFT;
      if (idx >= active_.load(std::memory_order_relaxed)) continue;
      const uint64_t start = w & ~FIELD;  // this job at chunk 0
      int64_t finished = 0;
      for (int64_t c; (c = claim(start)) >= 0; ++finished) (*fn_)(c);
      if (finished) done_.fetch_add(finished, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};
  const std::function<void(int64_t)>* fn_ = nullptr;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its helpers sleep until the process ends
  return *p;
}

}  // namespace

namespace {
std::atomic<int> threads{1};  // the engine sets prefill's and decode's (set_threads)
}  // namespace

void set_threads(int64_t n) { threads.store(static_cast<int>(std::max<int64_t>(1, n))); }

int pool_threads() { return threads.load(std::memory_order_relaxed); }

void parallel_chunks(int64_t n, const std::function<void(int64_t)>& fn) {
  pool().run(n, pool_threads() - 1, fn);
}
