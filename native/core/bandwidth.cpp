#include "core/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/thread_pool.h"

namespace osd {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)  // see fast_math.h
#define OSD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OSD_CLONES
#endif

namespace {

OSD_CLONES float sum_range(const float* x, size_t n) {
  float acc[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += x[i + k];
  float t = 0;
  for (; i < n; ++i) t += x[i];
  for (float a : acc) t += a;
  return t;
}

// 16 independent chains of 8-wide multiply-adds: enough to hide FMA latency on current cores.
OSD_CLONES float fma_chains(int64_t reps, float a) {
  float acc[16][8];
  for (int c = 0; c < 16; ++c)
    for (int k = 0; k < 8; ++k) acc[c][k] = 0.001f * (c + k);
  const float b = 0.999999f;
  for (int64_t r = 0; r < reps; ++r)
    for (int c = 0; c < 16; ++c)
      for (int k = 0; k < 8; ++k) acc[c][k] = acc[c][k] * b + a;
  float t = 0;
  for (int c = 0; c < 16; ++c)
    for (int k = 0; k < 8; ++k) t += acc[c][k];
  return t;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

BandwidthResult measure_bandwidth(size_t bytes, int iterations) {
  const size_t n = std::max<size_t>(bytes / sizeof(float), 1024);
  std::vector<float> a(n, 1.0f), b(n, 0.0f);
  ThreadPool& pool = default_pool();
  volatile float sink = 0;
  BandwidthResult r;
  for (int it = 0; it < std::max(1, iterations); ++it) {
    std::mutex mu;
    float total = 0;
    auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(n, 1 << 16, [&](size_t lo, size_t hi) {
      float s = sum_range(a.data() + lo, hi - lo);
      std::lock_guard<std::mutex> lk(mu);
      total += s;
    });
    double dt = seconds_since(t0);
    sink = sink + total;
    r.read_bytes_per_s = std::max(r.read_bytes_per_s, n * sizeof(float) / dt);
    t0 = std::chrono::steady_clock::now();
    pool.parallel_for(n, 1 << 16, [&](size_t lo, size_t hi) {
      std::memcpy(b.data() + lo, a.data() + lo, (hi - lo) * sizeof(float));
    });
    dt = seconds_since(t0);
    r.copy_bytes_per_s = std::max(r.copy_bytes_per_s, 2.0 * n * sizeof(float) / dt);
  }
  (void)sink;
  return r;
}

double measure_peak_flops(int iterations) {
  ThreadPool& pool = default_pool();
  const int threads = pool.size();
  const int64_t reps = 2'000'000;
  double best = 0;
  volatile float sink = 0;
  for (int it = 0; it < std::max(1, iterations); ++it) {
    std::mutex mu;
    float total = 0;
    auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(threads, 1, [&](size_t lo, size_t hi) {
      for (size_t i = lo; i < hi; ++i) {
        float s = fma_chains(reps, 1e-7f * static_cast<float>(i + 1));
        std::lock_guard<std::mutex> lk(mu);
        total += s;
      }
    });
    double dt = seconds_since(t0);
    sink = sink + total;
    best = std::max(best, 2.0 * 16 * 8 * static_cast<double>(reps) * threads / dt);
  }
  (void)sink;
  return best;
}

}  // namespace osd
