// A small persistent thread pool with a blocking parallel_for. The calling thread takes part,
// so a pool of n threads keeps n-1 workers. Work is split into contiguous chunks (a few per thread,
// taken dynamically for balance); each chunk is processed by one thread in index order, so results
// never depend on timing. Each thread takes the chunks of its own share first (the caller the
// first share, worker k the k-th), so passes split alike find their data where it was last
// touched. Idle workers spin briefly before sleeping: a decode step issues about a hundred
// parallel_for calls, and a condition-variable wake-up costs more than many small jobs.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace osd {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over [0, n) split into at most 4 * size() chunks of at least `grain` items.
  // The first exception thrown by any chunk is rethrown on the calling thread after all chunks end.
  void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);

  // A grain that splits n items into about one chunk per thread (at least min_grain items each):
  // each thread keeps one run of consecutive items, and a later pass split the same way finds its
  // share in the cache of the thread that read it.
  size_t grain_per_thread(size_t n, size_t min_grain = 1) const {
    return std::max(min_grain, n / static_cast<size_t>(size()));
  }

 private:
  void worker_loop(int id);
  // Claims and runs chunks of the job published as `word` until none is left, participant `self`
  // (0: the caller) from its own share first. A chunk is claimed by a compare-and-swap on work_, so
  // no lock is taken per chunk. Returns the last word seen.
  uint64_t run_chunks(uint64_t word, int self);
  void run_chunk(size_t chunk, size_t chunks);
  void finish_chunk(size_t chunks);

  // work_ = generation << 32 | the claims: one word, so a worker that slept through a whole job can
  // never claim a chunk of the next one with the old job's function. Jobs of up to kMaxClaimBits
  // chunks keep a bit per chunk (bits 0-23: any chunk can be claimed first) and their count in bits
  // 24-30, with kBitClaims set; larger jobs count a next chunk (bits 0-15) out of chunks (bits 16-30),
  // each thread taking the next one.
  static constexpr uint64_t kChunkMask = 0x7fff;
  static constexpr size_t kMaxClaimBits = 24;
  static constexpr uint64_t kBitClaims = uint64_t(1) << 31;
  static uint32_t gen_of(uint64_t w) { return static_cast<uint32_t>(w >> 32); }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one parallel_for at a time; nested calls run inline
  alignas(64) std::atomic<uint64_t> work_{0};  // own cache lines: every chunk writes these two
  // The job of the current generation; written before work_ publishes it, and stable while any of
  // its chunks runs (the next job starts only after every chunk has finished).
  const std::function<void(size_t, size_t)>* job_ = nullptr;
  size_t job_n_ = 0;
  alignas(64) std::atomic<size_t> done_chunks_{0};
  // Sleeping: workers that found no job after spinning, and the caller waiting for the last chunk.
  alignas(64) std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_sleeps_{false};
  bool stop_ = false;
  std::mutex err_mu_;
  std::exception_ptr error_;
};

// The grain (items per chunk) that gives each chunk at least min_chunk_work() units of work (one
// unit: a multiply-add). Tiny jobs then run on the calling thread: waking a worker costs a few
// microseconds, more than a 64 x 64 matrix-vector product.
size_t grain_for(double work_per_item);
double min_chunk_work();

// The process-wide pool used by the CPU backend. Sized to the hardware threads unless
// set_default_threads() was called before first use (or OSD_THREADS is set). set_default_threads()
// later switches to a pool of that size; pools are made once per size and kept (idle workers
// sleep), so calls already running finish on the pool they started on.
ThreadPool& default_pool();
void set_default_threads(int threads);
int default_threads();

}  // namespace osd
