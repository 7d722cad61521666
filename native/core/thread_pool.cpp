#include "thread_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace osd {

namespace {
thread_local bool tl_in_pool = false;

// Bounded spin (about 10-50 us), short enough not to starve other tenants of a shared machine.
constexpr int kSpin = 1000;
constexpr size_t kChunksPerThread = 4;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}
}  // namespace

ThreadPool::ThreadPool(int threads) {
  int n = std::max(1, threads);
  for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::finish_chunk(size_t chunks) {
  // The caller reads done_chunks_ before it sleeps (under mu_) and this thread reads caller_sleeps_
  // after counting (both sequentially consistent): one of the two sees the other.
  if (done_chunks_.fetch_add(1) + 1 == chunks && caller_sleeps_.load()) {
    { std::lock_guard<std::mutex> lk(mu_); }
    cv_done_.notify_all();
  }
}

void ThreadPool::run_chunk(size_t chunk, size_t chunks) {
  // The chunk is ours: its job cannot end (nor job_ change) before finish_chunk().
  const size_t n = job_n_;
  try {
    (*job_)(chunk * n / chunks, (chunk + 1) * n / chunks);
  } catch (...) {
    std::lock_guard<std::mutex> g(err_mu_);
    if (!error_) error_ = std::current_exception();
  }
  finish_chunk(chunks);
}

uint64_t ThreadPool::run_chunks(uint64_t w, int self) {
  const uint32_t gen = gen_of(w);
  if (w & kBitClaims) {
    // Own share first, then the others' leftovers in order. (Back to back, a spinning worker won
    // the first chunk of two-chunk jobs 26% of the time when chunks were taken in order, and
    // later passes then read what the other core had touched.)
    const size_t chunks = (w >> 24) & 0x7f, start = static_cast<size_t>(self) * chunks / static_cast<size_t>(size());
    for (size_t j = 0; j < chunks; ++j) {
      const size_t c = (start + j) % chunks;
      const uint64_t bit = uint64_t(1) << c;
      while (gen_of(w) == gen && !(w & bit)) {
        if (work_.compare_exchange_weak(w, w | bit, std::memory_order_acq_rel, std::memory_order_acquire)) {
          run_chunk(c, chunks);
          w = work_.load(std::memory_order_acquire);
          break;
        }
      }
      if (gen_of(w) != gen) return w;
    }
    return w;
  }
  for (;;) {
    const size_t next = w & kChunkMask, chunks = (w >> 16) & kChunkMask;
    if (gen_of(w) != gen || next >= chunks) return w;
    if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    run_chunk(next, chunks);
    w = work_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop(int id) {
  tl_in_pool = true;
  uint32_t seen = 0;
  for (;;) {
    uint64_t w = work_.load(std::memory_order_acquire);
    for (int k = 0; k < kSpin && gen_of(w) == seen; ++k) {
      cpu_relax();
      w = work_.load(std::memory_order_acquire);
    }
    if (gen_of(w) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      // Counted before the check (both sequentially consistent): parallel_for publishes the job,
      // then reads sleepers_, so either it wakes this thread or the check below sees the job.
      sleepers_.fetch_add(1);
      cv_work_.wait(lk, [&] { return stop_ || gen_of(work_.load()) != seen; });
      sleepers_.fetch_sub(1);
      if (stop_) return;
      w = work_.load(std::memory_order_acquire);
    }
    seen = gen_of(w);
    run_chunks(w, id);
  }
}

void ThreadPool::parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  size_t chunks = std::min<size_t>(size() * kChunksPerThread, std::max<size_t>(1, n / std::max<size_t>(1, grain)));
  chunks = std::min<size_t>(chunks, kChunkMask);
  if (chunks <= 1 || tl_in_pool) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> run(run_mu_);
  job_ = &fn;
  job_n_ = n;
  done_chunks_.store(0, std::memory_order_relaxed);
  const uint64_t gen = gen_of(work_.load(std::memory_order_relaxed)) + 1;
  const uint64_t claims = chunks <= kMaxClaimBits ? kBitClaims | chunks << 24 : chunks << 16;
  work_.store(gen << 32 | claims);  // publishes the job (sequentially consistent, see worker_loop)
  if (sleepers_.load() > 0) {
    { std::lock_guard<std::mutex> lk(mu_); }
    cv_work_.notify_all();
  }
  tl_in_pool = true;
  run_chunks(work_.load(std::memory_order_acquire), 0);
  tl_in_pool = false;
  for (int k = 0; k < 4 * kSpin && done_chunks_.load(std::memory_order_acquire) != chunks; ++k) cpu_relax();
  if (done_chunks_.load(std::memory_order_acquire) != chunks) {
    std::unique_lock<std::mutex> lk(mu_);
    caller_sleeps_.store(true);
    cv_done_.wait(lk, [&] { return done_chunks_.load() == chunks; });
    caller_sleeps_.store(false);
  }
  job_ = nullptr;
  std::exception_ptr err;
  {
    std::lock_guard<std::mutex> g(err_mu_);
    std::swap(err, error_);
  }
  if (err) std::rethrow_exception(err);
}

double min_chunk_work() {
  // OSD_MIN_CHUNK_WORK overrides the threshold (0 = always split), for measuring it.
  static const double w = [] {
    const char* env = std::getenv("OSD_MIN_CHUNK_WORK");
    return env ? std::atof(env) : 32768.0;
  }();
  return w;
}

size_t grain_for(double work_per_item) {
  const double w = min_chunk_work();
  if (!(work_per_item > 0.0) || w <= work_per_item) return 1;
  return static_cast<size_t>(std::ceil(w / work_per_item));
}

namespace {
// Pools are kept once made (one per size asked for; a pool not in use has its workers asleep), so
// that a call still running on a pool when another size is chosen never sees it freed.
std::mutex g_pool_mu;
std::vector<std::unique_ptr<ThreadPool>> g_pools;
std::atomic<ThreadPool*> g_pool{nullptr};
int g_threads = 0;

int initial_threads() {
  if (const char* env = std::getenv("OSD_THREADS")) {
    int t = std::atoi(env);
    if (t > 0) return t;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// The kept pool of `threads` threads, made on first use. Caller holds g_pool_mu.
ThreadPool* pool_of_size(int threads) {
  for (auto& p : g_pools)
    if (p->size() == threads) return p.get();
  g_pools.push_back(std::make_unique<ThreadPool>(threads));
  return g_pools.back().get();
}
}  // namespace

ThreadPool& default_pool() {
  if (ThreadPool* p = g_pool.load(std::memory_order_acquire)) return *p;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool.load(std::memory_order_relaxed)) {
    if (g_threads <= 0) g_threads = initial_threads();
    g_pool.store(pool_of_size(g_threads), std::memory_order_release);
  }
  return *g_pool.load(std::memory_order_relaxed);
}

void set_default_threads(int threads) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_threads = threads > 0 ? threads : initial_threads();
  ThreadPool* p = g_pool.load(std::memory_order_relaxed);
  if (p && p->size() != g_threads) g_pool.store(pool_of_size(g_threads), std::memory_order_release);
}

int default_threads() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_threads > 0 ? g_threads : initial_threads();
}

}  // namespace osd
