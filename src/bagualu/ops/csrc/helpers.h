// Helper threads that join a caller's loop when they can, and that the caller never waits for to start.
//
// Why not an OpenMP parallel region: its join barrier waits for every member of the team, so when the
// other core is busy a region whose second thread has not been scheduled costs the caller a scheduler time
// slice (measured here at load 5: 11.7 ms for a 0.85 ms batch-1 GEMM on 2 threads). Small kernels of a
// decode step (tens of microseconds each) then choose between one core and that risk.
//
// Here the caller posts a job of n chunks and claims chunks itself at once; helpers claim chunks too when
// they run. The caller waits only for chunks a helper has already claimed (running now), never for a
// helper to wake up: on a quiet machine the job gets every core, on a busy one it degrades to the caller
// alone. The cost of the split is one atomic claim per chunk.
//
//     state = gen (24 bits) | n chunks (20 bits) | next unclaimed chunk (20 bits)     one atomic word
//
// A claim is a CAS on the whole word, so a helper that wakes late can neither claim a chunk of a newer job
// with an older job's function nor one past the end. The job's function and context are read only after
// a successful claim; the job cannot finish (and be replaced) before that chunk is counted done.
//
// After its last chunk a helper spins (pause, yielding the core now and then) for kSpinUs, so the GEMMs of
// one decode step, microseconds apart, find it awake; then it sleeps on a condition variable, and a post
// wakes it (the caller does not wait for that). One pool per shared library, unless a library adopts
// another's (adopt(): the linear and attention kernels of a decode step then share one set of helpers, one
// per core, instead of two sets competing for the cores); a second concurrent caller (another Python
// thread) runs its chunks inline, and a forked child makes a fresh pool.

#pragma once

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BGL_CPU_PAUSE() _mm_pause()
#else
#define BGL_CPU_PAUSE() ((void)0)
#endif

namespace bgl {

class Helpers {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);
  static constexpr int64_t kMaxChunks = (int64_t(1) << 20) - 1;
  static constexpr int kMaxHelpers = 63;
  static constexpr int64_t kSpinUs = 2000;  // a decode step's GEMMs are < 1 ms apart

  // fn(ctx, c) for every c in [0, n), on the caller and up to `helpers` helper threads; returns when all
  // are done. n must be <= kMaxChunks.
  static void run(int helpers, int64_t n, Fn fn, const void* ctx) {
    if (helpers > kMaxHelpers) helpers = kMaxHelpers;
    Helpers* pool = helpers > 0 && n > 1 ? instance() : nullptr;
    if (pool == nullptr || pool->busy_.exchange(true, std::memory_order_acquire)) {
      for (int64_t c = 0; c < n; ++c) fn(ctx, c);  // one thread, or a concurrent caller: inline
      return;
    }
    pool->post(helpers, n, fn, ctx);
    pool->busy_.store(false, std::memory_order_release);
  }

  // This library's pool (made on first use), as an opaque handle for another library to adopt.
  static void* handle() { return instance(); }
  // Post to the pool `handle` (from another library built from this header) from now on.
  static void adopt(void* handle) { slot().store(static_cast<Helpers*>(handle), std::memory_order_release); }

 private:
  static constexpr int kNextBits = 20, kNBits = 20;
  static constexpr uint64_t kMask = (uint64_t(1) << 20) - 1;

  std::atomic<uint64_t> state_{0};
  std::atomic<Fn> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};  // helpers with index < active_ take part in the current job
  std::atomic<int> sleepers_{0};
  std::atomic<bool> busy_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  int spawned_ = 0;  // only the (busy_-holding) caller spawns
  pid_t pid_ = getpid();

  static std::atomic<Helpers*>& slot() {
    static std::atomic<Helpers*> pool{nullptr};
    return pool;
  }

  static Helpers* instance() {
    std::atomic<Helpers*>& pool = slot();
    Helpers* p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != getpid()) {  // first use, or a forked child: its helpers did not survive
      // Never freed: detached helpers may still be inside wait() at exit. Two racing first callers make
      // two pools; the loser's helpers just sleep.
      Helpers* fresh = new Helpers();
      if (pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
      delete fresh;
      return p->pid_ == getpid() ? p : nullptr;
    }
    return p;
  }

  static uint64_t gen_of(uint64_t s) { return s >> (kNextBits + kNBits); }

  // Claim the next chunk of the job in `state_`; -1 when there is none.
  int64_t claim() {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = s & kMask, n = (s >> kNextBits) & kMask;
      if (next >= n) return -1;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return int64_t(next);
    }
  }

  void work() {
    for (int64_t c; (c = claim()) >= 0;) {
      fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void post(int helpers, int64_t n, Fn fn, const void* ctx) {
    while (spawned_ < helpers) {
      const int index = spawned_++;
      std::thread([this, index] { helper_loop(index); }).detach();
    }
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    active_.store(helpers, std::memory_order_relaxed);
    const uint64_t gen = (gen_of(state_.load(std::memory_order_relaxed)) + 1) & ((uint64_t(1) << 24) - 1);
    state_.store((gen << (kNextBits + kNBits)) | (uint64_t(n) << kNextBits), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    work();
    while (done_.load(std::memory_order_acquire) < n) BGL_CPU_PAUSE();  // only chunks a helper is running
  }

  void helper_loop(int index) {
    uint64_t seen = gen_of(state_.load(std::memory_order_acquire));
    for (;;) {
      // wait for a job newer than `seen`: spin a while, then sleep
      auto start = std::chrono::steady_clock::now();
      for (int i = 0;; ++i) {
        if (gen_of(state_.load(std::memory_order_acquire)) != seen) break;
        BGL_CPU_PAUSE();
        if ((i & 255) == 255) {
          sched_yield();  // let another runnable thread have this core
          if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinUs)) {
            std::unique_lock<std::mutex> lk(mu_);
            sleepers_.fetch_add(1, std::memory_order_seq_cst);
            cv_.wait(lk, [&] { return gen_of(state_.load(std::memory_order_seq_cst)) != seen; });
            sleepers_.fetch_sub(1, std::memory_order_relaxed);
            break;
          }
        }
      }
      seen = gen_of(state_.load(std::memory_order_acquire));
      if (index < active_.load(std::memory_order_relaxed)) work();
    }
  }
};

}  // namespace bgl
