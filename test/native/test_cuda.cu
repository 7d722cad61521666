// Parity tests: every CUDA op against the CPU reference (cpu_backend(), spec/, distill/), on random
// inputs, with the tolerance of each op stated where it is checked. Built by CMake (target test_cuda)
// when the CUDA backend is built; run it directly or through ctest. Standalone build:
//   nvcc -std=c++17 -O3 -arch=sm_90 -I native -I cuda -I test/native test/native/test_cuda.cu cuda/*.cu \
//        build/libosd_engine.a -o test_cuda
//
// Without a usable device every test prints "skip" and the binary exits 0 with
// "0 passed, 0 failed, N skipped" (a missing GPU is never counted as a pass).
//
// Tolerances:
//   device math (exp_approx, Philox)         bit-identical; exp_fast = exp_ref on every float x <= 0
//   warp_rows vs WarpedRow::to_dense         bit-identical floats
//   blocked-scheme sums (host check)         bit-identical to the scheme written out op by op
//   chain / tree verification                identical accepted counts, paths and tokens: 0 mismatches
//   chi-square exactness on the GPU          p > 1e-3 for the kernels, p < 1e-6 with a planted fault
//   distillation loss (vs distill_row)       |d| <= 2e-5 * max(1, |loss|)
//   distillation gradient (vs distill_row)   |d_j| <= 1e-6 * max|g| + 1e-5 * |g_j|
//   forward KL, dense teacher (blocked)      gradient bit-identical; loss |d| <= 1e-12 * max(1, |loss|)
//                                            (the same operations; only log() may differ in its last bit)
//   reverse KL / JSD / TVD, dense, blocked   vs the CPU's blocked path: loss |d| <= 1e-5 * max(1, |loss|),
//                                            gradient as test_kernels' fast-path check (sums in another order)
//   AdamW                                    |d| <= 1e-6 * |x| + 1e-9 (bit-identical with -ffp-contract=off)
//   global norm                              relative 1e-12
//   tree mask, KV compaction                 exact
//   model pass: Q8_0 / Q4_0 / Q4_1 products  bit-identical to the CPU's matmul (the same operations)
//   model pass: F32 / F16 / BF16 / Q5_0      |d| <= 1e-5 * sum |w x| + 1e-6 against a double product
//   model pass: logits vs the CPU engine     max |d| <= tol * max(1, max |logit|) per row: tol 2e-3
//                                            for float weights, 3e-2 quantised (a flipped 8-bit
//                                            rounding of an activation moves a logit by ~1e-3 of its
//                                            scale), 6e-2 for SmolLM2's 30 layers (to be calibrated
//                                            from the printed worst case on a first GPU run)
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "check.h"
#include "common.cuh"
#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"
#include "chain_blocked.cuh"
#include "cuda_backend.h"
#include "distill.cuh"
#include "model/model.h"
#include "model/model_io.h"
#include "model/quant.h"
#include "model/random_model.h"
#include "model/sequence.h"
#include "model/tensor_ops.h"
#include "model_pass.h"

using namespace osd;

namespace {

struct Skip {
  std::string why;
};

CudaBackend* gpu_or_null(std::string* why) {
  static std::string reason;
  static Backend* b = cuda_backend_or_null(&reason);
  if (why) *why = reason;
  return static_cast<CudaBackend*>(b);
}

CudaBackend& gpu() {
  std::string why;
  CudaBackend* g = gpu_or_null(&why);
  if (!g) throw Skip{why};
  return *g;
}

Backend& cpu() { return cpu_backend(); }

// Sets the dense-teacher reverse KL / JSD / TVD path for one test and restores it after.
struct BlockedDivergence {
  bool was = cuda::blocked_divergence();
  explicit BlockedDivergence(bool on) { cuda::set_blocked_divergence(on); }
  ~BlockedDivergence() { cuda::set_blocked_divergence(was); }
};

int device_sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n;
}

// Sets the one-pass (cluster) reverse KL / JSD / TVD for one test and restores it after.
struct ClusterDivergence {
  bool was = cuda::cluster_divergence();
  explicit ClusterDivergence(bool on) { cuda::set_cluster_divergence(on); }
  ~ClusterDivergence() { cuda::set_cluster_divergence(was); }
};

int device_cc_major() {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major;
}

// Sets the tree launch path for one test and restores the default after.
struct TreeLaunchMode {
  explicit TreeLaunchMode(cuda::TreeLaunch m) { cuda::set_tree_launch(m); }
  ~TreeLaunchMode() { cuda::set_tree_launch(cuda::TreeLaunch::Auto); }
};

// distill_loss on the CPU reference (distill_row on every counted row, in double per entry, as the
// CUDA losses compute): the CPU backend's float fast paths are held to it in test_kernels.
double reference_distill_loss(const DistillInput& in, float* grad) {
  validate_distill(in);
  const size_t V = static_cast<size_t>(in.vocab);
  int32_t counted = 0;
  for (int32_t r = 0; r < in.rows; ++r) counted += (!in.mask || in.mask[r]) ? 1 : 0;
  if (grad) std::fill(grad, grad + in.rows * V, 0.0f);
  if (counted == 0) return 0.0;
  const float scale = 1.0f / static_cast<float>(counted);
  double loss = 0.0;
  for (int32_t r = 0; r < in.rows; ++r)
    if (!in.mask || in.mask[r]) loss += distill_row(in, r, scale, grad ? grad + r * V : nullptr);
  return loss / counted;
}

using Rng = std::mt19937_64;

double uniform(Rng& rng) { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
int randint(Rng& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// Random logits: normal with the given scale; some rows quantised (ties) or with -Infinity entries.
void fill_logits(Rng& rng, float* row, int V, float scale, int style) {
  std::normal_distribution<float> nd(0.0f, scale);
  for (int j = 0; j < V; ++j) row[j] = nd(rng);
  if (style == 1)  // ties
    for (int j = 0; j < V; ++j) row[j] = std::round(row[j] * 2.0f) * 0.5f;
  if (style == 2) {  // -Infinity entries, one finite entry kept
    for (int j = 0; j < V; ++j)
      if (uniform(rng) < 0.3) row[j] = -std::numeric_limits<float>::infinity();
    row[randint(rng, 0, V - 1)] = nd(rng);
  }
  if (style == 3) {  // a plateau: every entry ties but a few, so a top-k cut falls inside thousands of ties
    for (int j = 0; j < V; ++j) row[j] = 0.0f;
    for (int i = 0; i < 10; ++i) row[randint(rng, 0, V - 1)] = std::fabs(nd(rng)) + 0.5f;
  }
}

std::vector<float> warped_dense(const float* logits, int V, const Sampling& s) {
  WarpedRow w;
  warp_row(logits, V, checked_row_max(logits, V, "x", 0), s, w);
  std::vector<float> d(V);
  w.to_dense(d.data());
  return d;
}

int sample_dense(const std::vector<float>& p, double u) {
  double t = 0.0;
  for (float x : p) t += x;
  double target = u * t, c = 0.0;
  int last = 0;
  for (size_t j = 0; j < p.size(); ++j) {
    if (p[j] <= 0.0f) continue;
    c += p[j];
    last = static_cast<int>(j);
    if (c > target) return last;
  }
  return last;
}

Sampling random_sampling(Rng& rng, int V, bool allow_greedy = true) {
  Sampling s;
  const double r = uniform(rng);
  const float temps[] = {0.6f, 1.0f, 1.4f};
  s.temperature = temps[randint(rng, 0, 2)];
  if (allow_greedy && r < 0.15) {
    s.temperature = 0.0f;
  } else if (r < 0.55) {
    // dense
  } else if (r < 0.72) {
    s.top_k = uniform(rng) < 0.8 ? randint(rng, 1, std::max(1, std::min(V - 1, 64))) : V + randint(rng, 0, 3);
  } else if (r < 0.89) {
    const float ps[] = {0.3f, 0.6f, 0.9f, 0.95f};
    s.top_p = ps[randint(rng, 0, 3)];
  } else {
    s.top_k = randint(rng, 1, std::max(1, std::min(V, 40)));
    s.top_p = 0.8f;
  }
  return s;
}

std::string sampling_str(const Sampling& s) {
  char b[96];
  std::snprintf(b, sizeof b, "T=%g k=%d p=%g", s.temperature, s.top_k, s.top_p);
  return b;
}

// Regularised upper incomplete gamma Q(a, x) (Numerical Recipes gammq), for chi-square p-values.
double gamma_q(double a, double x) {
  if (x <= 0.0) return 1.0;
  const double gln = std::lgamma(a);
  if (x < a + 1.0) {
    double ap = a, sum = 1.0 / a, del = sum;
    for (int n = 0; n < 10000; ++n) {
      ap += 1.0;
      del *= x / ap;
      sum += del;
      if (std::fabs(del) < std::fabs(sum) * 1e-15) break;
    }
    return 1.0 - sum * std::exp(-x + a * std::log(x) - gln);
  }
  double b = x + 1.0 - a, c = 1.0 / 1e-300, d = 1.0 / b, h = d;
  for (int i = 1; i < 10000; ++i) {
    const double an = -i * (i - a);
    b += 2.0;
    d = an * d + b;
    if (std::fabs(d) < 1e-300) d = 1e-300;
    c = b + an / c;
    if (std::fabs(c) < 1e-300) c = 1e-300;
    d = 1.0 / d;
    const double del = d * c;
    h *= del;
    if (std::fabs(del - 1.0) < 1e-15) break;
  }
  return std::exp(-x + a * std::log(x) - gln) * h;
}

// Pearson's chi-square of observed counts against probabilities (bins with expectation < 5 merged).
double chi_square_p(const std::vector<long>& counts, const std::vector<double>& p) {
  long n = 0;
  for (long c : counts) n += c;
  double stat = 0.0, exp_acc = 0.0, obs_acc = 0.0;
  int bins = 0;
  for (size_t j = 0; j < p.size(); ++j) {
    const double e = p[j] * n;
    if (e <= 0.0) {
      if (counts[j] > 0) return 0.0;  // a token with probability 0 was emitted
      continue;
    }
    exp_acc += e;
    obs_acc += counts[j];
    if (exp_acc >= 5.0) {
      stat += (obs_acc - exp_acc) * (obs_acc - exp_acc) / exp_acc;
      exp_acc = obs_acc = 0.0;
      ++bins;
    }
  }
  if (exp_acc > 0.0) stat += (obs_acc - exp_acc) * (obs_acc - exp_acc) / std::max(exp_acc, 1e-9), ++bins;
  if (bins < 2) return 1.0;
  return gamma_q(0.5 * (bins - 1), 0.5 * stat);
}

__global__ void exp_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = osd::cuda::exp_ref(x[i]);
}

// Counts the floats x <= 0 (every pattern with the sign bit set, and +0) where exp_fast and exp_ref
// differ in bits (a NaN input must give NaN from both).
__global__ void exp_fast_kernel(unsigned long long* bad) {
  unsigned long long local = 0;
  const uint64_t step = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i <= 0x80000000ull; i += step) {
    const uint32_t bits = i == 0x80000000ull ? 0u : (0x80000000u | static_cast<uint32_t>(i));
    const float x = __uint_as_float(bits);
    const float a = osd::cuda::exp_fast(x), b = osd::cuda::exp_ref(x);
    local += !((a != a && b != b) || __float_as_uint(a) == __float_as_uint(b));
  }
  if (local) atomicAdd(bad, local);
}

__global__ void philox_kernel(uint64_t seed, uint64_t stream, double* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = osd::philox_uniform(seed, stream ^ static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull,
                                          static_cast<uint32_t>(i), static_cast<uint32_t>(i & 1));
}

// sum_exp() of sampling.cpp written with explicitly separate roundings: what the GPU computes.
double z_no_contraction(const float* l, int V, float mx, float inv_t) {
  volatile float acc[16] = {};
  int j = 0;
  for (; j + 16 <= V; j += 16)
    for (int k = 0; k < 16; ++k) {
      volatile float a = l[j + k] - mx;
      volatile float x = a * inv_t;
      acc[k] = acc[k] + exp_approx(x);
    }
  double t = 0.0;
  for (; j < V; ++j) t += exp_approx((l[j] - mx) * inv_t);
  for (int k = 0; k < 16; ++k) t += acc[k];
  return t;
}

// The blocked scheme (spec/sampling.h) as the GPU computes it (blk_stats_kernel and
// chain_decide_kernel in cuda/chain_blocked.cu): every operation rounded on its own, lane k of a
// warp summing entries 32 i + k of a block, then the xor butterfly, whose lane 0 is a_0 + a_16, then
// + (a_8 + a_24) ...
float lane_sum_device_order(const float* e, int n) {
  volatile float a[32] = {};
  for (int j = 0; j < n; ++j) a[j % 32] = a[j % 32] + e[j];
  for (int o = 16; o > 0; o >>= 1) {
    float b[32];
    for (int k = 0; k < 32; ++k) b[k] = a[k] + a[k ^ o];
    for (int k = 0; k < 32; ++k) a[k] = b[k];
  }
  return a[0];
}

float v_sub(float a, float b) { volatile float r = a - b; return r; }
float v_mul(float a, float b) { volatile float r = a * b; return r; }

}  // namespace

// ---------------------------------------------------------------------------------------------

OSD_TEST(cpu_blocked_scheme_rounds_like_device) {
  // Host only (no device needed): the CPU's fast paths (dense_rows, which verify_chain_blocked
  // matches bit for bit, and forward_kl_row_blocked) must produce the bits the GPU kernels compute, i.e. the blocked scheme
  // with every operation rounded on its own and the lanes folded in the device's butterfly order.
  // Fails if the engine is built with contracted multiply-adds or a different lane order.
  Rng rng(21);
  int row_diff = 0, fkl_diff = 0;
  for (int trial = 0; trial < 24; ++trial) {
    const int V = trial < 8 ? randint(rng, 1, 3000) : randint(rng, 3000, 20000);
    std::vector<float> l(V), t(V);
    fill_logits(rng, l.data(), V, 3.0f, trial % 3);
    const float T = trial % 2 ? 0.7f : (trial % 4 == 0 ? 1.0f : 1.3f);
    const float it = 1.0f / T;
    DenseRow d;
    DenseRow* out = &d;
    const float* rows = l.data();
    dense_rows(&rows, 1, V, it, &out);
    CHECK(d.check == RowCheck::Ok);
    double z = 0.0;
    bool same = true;
    for (int b = 0; b < stat_blocks(V); ++b) {
      const int j0 = b * kStatBlock, n = std::min(kStatBlock, V - j0);
      float bm = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n; ++j) bm = l[j0 + j] > bm ? l[j0 + j] : bm;
      std::vector<float> e(n, 0.0f);
      if (bm != -std::numeric_limits<float>::infinity())
        for (int j = 0; j < n; ++j) e[j] = exp_approx(v_mul(v_sub(l[j0 + j], bm), it));
      const float sb = lane_sum_device_order(e.data(), n);
      const float cb = bm == -std::numeric_limits<float>::infinity() ? 0.0f : exp_approx(v_mul(v_sub(bm, d.max), it));
      const float wb = v_mul(sb, cb);
      same &= std::memcmp(d.e.data() + j0, e.data(), n * sizeof(float)) == 0;
      same &= d.scale[b] == cb && d.mass[b] == wb;
      z += static_cast<double>(wb);
    }
    row_diff += !same || d.z != z;
    // Forward KL (dense teacher), the GPU's forward_kl_blocked written out on the host.
    fill_logits(rng, t.data(), V, 2.0f, 0);
    fill_logits(rng, l.data(), V, 2.0f, 0);
    DistillInput in;
    in.student = l.data();
    in.teacher = t.data();
    in.rows = 1;
    in.vocab = V;
    in.temperature = T;
    const float scale = 0.5f;
    std::vector<float> g(V);
    const double loss = forward_kl_row_blocked(in, 0, scale, g.data());
    const int nb = stat_blocks(V);
    std::vector<float> bs(nb), bt(nb), ss(nb), st(nb), ds(nb);
    float ms = -FLT_MAX, mt = -FLT_MAX;
    for (int b = 0; b < nb; ++b) {
      const int j0 = b * kStatBlock, n = std::min(kStatBlock, V - j0);
      bs[b] = bt[b] = -FLT_MAX;
      for (int j = 0; j < n; ++j) bs[b] = std::max(bs[b], l[j0 + j]), bt[b] = std::max(bt[b], t[j0 + j]);
      std::vector<float> es(n), et(n), ed(n);
      for (int j = 0; j < n; ++j) {
        const float dsj = v_sub(l[j0 + j], bs[b]), tt = v_sub(t[j0 + j], bt[b]);
        es[j] = exp_approx(v_mul(dsj, it));
        et[j] = exp_approx(v_mul(tt, it));
        ed[j] = v_mul(et[j], v_mul(v_sub(tt, dsj), it));
      }
      ss[b] = lane_sum_device_order(es.data(), n);
      st[b] = lane_sum_device_order(et.data(), n);
      ds[b] = lane_sum_device_order(ed.data(), n);
      ms = std::max(ms, bs[b]), mt = std::max(mt, bt[b]);
    }
    std::vector<float> cs(nb), ct(nb);
    double zs = 0.0, zt = 0.0, cross = 0.0;
    for (int b = 0; b < nb; ++b) {
      cs[b] = exp_approx(v_mul(v_sub(bs[b], ms), it));
      ct[b] = exp_approx(v_mul(v_sub(bt[b], mt), it));
      zs += static_cast<double>(v_mul(ss[b], cs[b]));
      zt += static_cast<double>(v_mul(st[b], ct[b]));
    }
    for (int b = 0; b < nb; ++b) {
      volatile double k = ((static_cast<double>(bt[b]) - mt) - (static_cast<double>(bs[b]) - ms)) * it;
      volatile double sk = static_cast<double>(st[b]) * k;
      volatile double term = static_cast<double>(ds[b]) + sk;
      volatile double prod = static_cast<double>(ct[b]) * term;
      cross = cross + prod;
    }
    const double want = cross / zt + std::log(zs) - std::log(zt);
    const float gscale = v_mul(scale, it);
    bool gsame = true;
    for (int j = 0; j < V; ++j) {
      const int b = j / kStatBlock;
      const float qs = static_cast<float>(cs[b] / zs), qt = static_cast<float>(ct[b] / zt);
      const float es = exp_approx(v_mul(v_sub(l[j], bs[b]), it)), et = exp_approx(v_mul(v_sub(t[j], bt[b]), it));
      const float gj = v_mul(gscale, v_sub(v_mul(es, qs), v_mul(et, qt)));
      gsame &= std::memcmp(&gj, &g[j], sizeof gj) == 0;
    }
    fkl_diff += !gsame || loss != want;
  }
  if (row_diff || fkl_diff)
    std::fprintf(stderr, "  blocked scheme: %d rows, %d forward-KL rows differ from the device's operation order\n",
                 row_diff, fkl_diff);
  CHECK_EQ(row_diff, 0);
  CHECK_EQ(fkl_diff, 0);
}

namespace {

// blocked_sample() of cuda/chain_blocked.cu replayed on the host, thread by thread (kBlock threads
// of four entries, the warps' shfl_up scans, the warp totals in order): returns the token and sets
// *certified when the device would take it without running the CPU's loop. The replay checks the
// sampler's logic (block choice, prefix sums, error bound) where no device is present; the device
// code itself is compared with the CPU by chain_batch_matches_cpu.
int replay_blocked_sample(const DenseRow& d, double u, bool* certified) {
  constexpr int kThreads = osd::cuda::kBlock;
  const int V = d.vocab, nb = stat_blocks(V);
  *certified = false;
  double total = 0.0;
  for (int b = 0; b < nb; ++b) total += static_cast<double>(d.mass[b]);
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum0 = 0.0;
  int sel = -1;
  for (int b = 0; b < nb; ++b) {
    const float m = d.mass[b];
    if (!(m > 0.0f)) continue;
    if (cum0 + m <= target) {
      cum0 += m;
      continue;
    }
    sel = b;
    break;
  }
  if (sel >= 0) {
    const int j0 = sel * kStatBlock, n = std::min(kStatBlock, V - j0);
    std::vector<float> x(4 * kThreads);
    std::vector<double> part(kThreads), incl(kThreads), excl(kThreads), wsum(kThreads / 32);
    for (int t = 0; t < kThreads; ++t) {
      for (int i = 0; i < 4; ++i) {
        const int j = 4 * t + i;
        x[j] = j < n ? d.e[j0 + j] * d.scale[sel] : 0.0f;
        part[t] += static_cast<double>(x[j]);
      }
      incl[t] = part[t];
    }
    for (int w = 0; w < kThreads / 32; ++w) {
      double* a = incl.data() + 32 * w;
      for (int o = 1; o < 32; o <<= 1) {
        double nxt[32];
        for (int l = 0; l < 32; ++l) nxt[l] = l >= o ? a[l - o] + a[l] : a[l];
        std::copy(nxt, nxt + 32, a);
      }
      for (int l = 0; l < 32; ++l) excl[32 * w + l] = l == 0 ? 0.0 : a[l - 1];
      wsum[w] = a[31];
    }
    double wtotal = 0.0;
    std::vector<double> wbase(kThreads / 32);
    for (int w = 0; w < kThreads / 32; ++w) wbase[w] = wtotal, wtotal += wsum[w];
    const double margin = 4.01 * (static_cast<double>(n) + 2.0) * 1.1102230246251565e-16 * (cum0 + wtotal);
    for (int t = 0; t < kThreads; ++t) {
      double c = cum0 + (wbase[t / 32] + excl[t]);
      for (int i = 0; i < 4; ++i) {
        const double ce = c;
        c += static_cast<double>(x[4 * t + i]);
        if (x[4 * t + i] > 0.0f && c > target) {  // the first hit over all threads is this one
          *certified = c > target + margin && ce < target - margin;
          if (*certified) return j0 + 4 * t + i;
          return sample_dense(d, u);  // the device runs the CPU's loop
        }
      }
    }
  }
  return sample_dense(d, u);
}

}  // namespace

OSD_TEST(blocked_sampler_replay_matches_cpu) {
  // Host only: random draws and draws placed at, just below and just above the CPU's CDF steps
  // (where the error bound must hand over to the CPU's loop).
  Rng rng(22);
  long draws = 0, certified_draws = 0, wrong = 0;
  for (int trial = 0; trial < 12; ++trial) {
    const int V = randint(rng, 1, 9000);
    std::vector<float> l(V);
    fill_logits(rng, l.data(), V, trial % 2 ? 1.0f : 4.0f, trial % 3);
    DenseRow d;
    DenseRow* out = &d;
    const float* rows = l.data();
    dense_rows(&rows, 1, V, 1.0f / 0.9f, &out);
    std::vector<double> us;
    for (int i = 0; i < 300; ++i) us.push_back(uniform(rng));
    // The CPU's running sums at a few tokens: u * total placed on them.
    double total = 0.0;
    for (int b = 0; b < stat_blocks(V); ++b) total += static_cast<double>(d.mass[b]);
    for (int i = 0; i < 40; ++i) {
      const int tok = randint(rng, 0, V - 1);
      double cum = 0.0;
      for (int b = 0; b < tok / kStatBlock; ++b) cum += d.mass[b] > 0.0f ? static_cast<double>(d.mass[b]) : 0.0;
      for (int j = tok / kStatBlock * kStatBlock; j <= tok; ++j) {
        const float x = d.e[j] * d.scale[j / kStatBlock];
        if (x > 0.0f) cum += x;
      }
      const double u0 = cum / total;
      for (double u : {u0, std::nextafter(u0, 0.0), std::nextafter(u0, 1.0)})
        if (u >= 0.0 && u < 1.0) us.push_back(u);
    }
    for (double u : us) {
      bool cert = false;
      const int a = replay_blocked_sample(d, u, &cert), b = sample_dense(d, u);
      wrong += a != b;
      certified_draws += cert;
      ++draws;
    }
  }
  std::printf("  blocked sampler replay: %ld draws, %ld decided by the bound, %ld differ\n", draws, certified_draws,
              wrong);
  CHECK_EQ(wrong, 0L);
  CHECK(certified_draws > draws / 2);
}

OSD_TEST(cpu_reference_rounds_without_contraction) {
  // The GPU reproduces the CPU reference's z (sampling.cpp sum_exp: trees, warp_rows, top-k/top-p
  // and chains under a planted fault) bit for bit only if the CPU build does not fuse a*b+c into
  // FMAs. GCC does so by default (-ffp-contract=fast) in the x86-64-v3 clones. The blocked fast
  // paths are checked the same way, without a device, by cpu_blocked_scheme_rounds_like_device.
  gpu();
  Rng rng(11);
  int diff = 0;
  for (int trial = 0; trial < 50; ++trial) {
    const int V = randint(rng, 16, 3000);
    std::vector<float> l(V);
    fill_logits(rng, l.data(), V, 3.0f, trial % 3);
    Sampling s;
    s.temperature = trial % 2 ? 0.7f : 1.3f;
    RowStats st;
    compute_row_stats(l.data(), V, s, "x", 0, st);
    diff += st.z != z_no_contraction(l.data(), V, st.max, 1.0f / s.temperature);
  }
  if (diff)
    std::fprintf(stderr,
                 "  the CPU reference's softmax sums use fused multiply-adds (%d of 50 rows differ): build osd_engine "
                 "with -ffp-contract=off, or GPU and CPU can pick different tokens\n",
                 diff);
  CHECK_EQ(diff, 0);
}

OSD_TEST(exp_fast_matches_exp_ref) {
  gpu();
  unsigned long long* d = nullptr;
  unsigned long long bad = 0;
  OSD_CUDA_CHECK(cudaMalloc(&d, sizeof bad));
  OSD_CUDA_CHECK(cudaMemset(d, 0, sizeof bad));
  exp_fast_kernel<<<1024, 256>>>(d);
  OSD_CUDA_CHECK(cudaGetLastError());
  OSD_CUDA_CHECK(cudaMemcpy(&bad, d, sizeof bad, cudaMemcpyDeviceToHost));
  cudaFree(d);
  std::printf("  exp_fast: every float x <= 0 (2^31 + 1 values), %llu differ from exp_ref\n", bad);
  CHECK_EQ(bad, 0ull);
}

OSD_TEST(device_math_bit_identical) {
  gpu();
  const int n = 1 << 20;
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) x[i] = -100.0f + 200.0f * static_cast<float>(i) / n;
  x[0] = -std::numeric_limits<float>::infinity();
  x[1] = 0.0f;
  x[2] = -0.0f;
  x[3] = -87.3f;
  x[4] = 88.3f;
  float *dx, *dy;
  double* du;
  OSD_CUDA_CHECK(cudaMalloc(&dx, n * sizeof(float)));
  OSD_CUDA_CHECK(cudaMalloc(&dy, n * sizeof(float)));
  OSD_CUDA_CHECK(cudaMalloc(&du, n * sizeof(double)));
  OSD_CUDA_CHECK(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  exp_kernel<<<(n + 255) / 256, 256>>>(dx, dy, n);
  philox_kernel<<<(n + 255) / 256, 256>>>(0x1234567890abcdefull, 77, du, n);
  std::vector<double> u(n);
  OSD_CUDA_CHECK(cudaMemcpy(y.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost));
  OSD_CUDA_CHECK(cudaMemcpy(u.data(), du, n * sizeof(double), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(du);
  int bad_exp = 0, bad_u = 0;
  for (int i = 0; i < n; ++i) {
    const float ref = exp_approx(x[i]);
    bad_exp += std::memcmp(&ref, &y[i], sizeof(float)) != 0;
    const double ur = philox_uniform(0x1234567890abcdefull, 77 ^ static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull,
                                     static_cast<uint32_t>(i), static_cast<uint32_t>(i & 1));
    bad_u += ur != u[i];
  }
  CHECK_EQ(bad_exp, 0);
  CHECK_EQ(bad_u, 0);
}

OSD_TEST(warp_rows_match_cpu) {
  CudaBackend& g = gpu();
  Rng rng(3);
  const int vocabs[] = {1, 7, 100, 1000, 5000, 32000, 128256};
  long mismatched = 0, cases = 0;
  for (int V : vocabs) {
    const int combos = V >= 32000 ? 10 : 40;
    for (int c = 0; c < combos; ++c) {
      Sampling s = random_sampling(rng, V, false);
      if (c % 7 == 3) s.top_k = std::min(V, 6000), s.top_p = 1.0f;  // candidate sets beyond shared memory
      if (c % 7 == 5) s.top_k = 0, s.top_p = 0.97f, s.temperature = 2.0f;  // large nuclei
      if (c % 7 == 6) s.top_k = std::min(V, 50), s.top_p = 1.0f;          // ties at the cut (plateau rows below)
      const int rows = V >= 32000 ? 2 : 4;
      std::vector<float> l(static_cast<size_t>(rows) * V), out(l.size());
      // Plateau rows (c % 7 == 6) put thousands of ties at the top-k threshold: the selection's
      // fallback when its candidate set overflows shared memory.
      for (int r = 0; r < rows; ++r)
        fill_logits(rng, l.data() + static_cast<size_t>(r) * V, V, 1.0f + 2.0f * (c % 3), c % 7 == 6 ? 3 : (c + r) % 3);
      g.warp_rows(l.data(), rows, V, s, out.data());
      for (int r = 0; r < rows; ++r) {
        auto ref = warped_dense(l.data() + static_cast<size_t>(r) * V, V, s);
        long m = 0;
        for (int j = 0; j < V; ++j) m += std::memcmp(&ref[j], &out[static_cast<size_t>(r) * V + j], 4) != 0;
        if (m && mismatched < 5) std::fprintf(stderr, "  warp V=%d %s row %d: %ld floats differ\n", V, sampling_str(s).c_str(), r, m);
        mismatched += m != 0;
        ++cases;
      }
    }
  }
  std::printf("  warp_rows: %ld rows compared, %ld differ\n", cases, mismatched);
  CHECK_EQ(mismatched, 0L);
}

namespace {

struct ChainCase {
  int B = 0, V = 0;
  uint64_t seed = 0;
  std::vector<int32_t> lengths, tokens;
  std::vector<uint64_t> streams;
  std::vector<Sampling> sampling;
  std::vector<float> target, draft;
};

ChainCase make_chain_case(Rng& rng, int B, int V, int gmax) {
  ChainCase c;
  c.B = B;
  c.V = V;
  c.seed = rng();
  size_t nt = 0, nd = 0;
  for (int b = 0; b < B; ++b) {
    const int g = randint(rng, 0, gmax);
    c.lengths.push_back(g);
    c.streams.push_back(rng());
    c.sampling.push_back(random_sampling(rng, V));
    nt += g + 1;
    nd += g;
  }
  c.target.resize(nt * V);
  c.draft.resize(nd * V);
  size_t trow = 0, drow = 0;
  for (int b = 0; b < B; ++b) {
    const int g = c.lengths[b];
    const float scale = uniform(rng) < 0.5 ? 1.5f : 4.0f;
    const int style = randint(rng, 0, 5) % 3;
    const double noise = uniform(rng) < 0.3 ? 0.05 : (uniform(rng) < 0.5 ? 0.5 : 3.0);
    std::normal_distribution<float> nd(0.0f, static_cast<float>(noise));
    for (int i = 0; i <= g; ++i) fill_logits(rng, &c.target[(trow + i) * V], V, scale, style);
    for (int i = 0; i < g; ++i) {
      float* d = &c.draft[(drow + i) * V];
      const float* t = &c.target[(trow + i) * V];
      for (int j = 0; j < V; ++j) d[j] = std::isfinite(t[j]) ? t[j] + nd(rng) : t[j];
      Sampling sd = c.sampling[b];
      int tok;
      const double r = uniform(rng);
      if (sd.greedy() || r < 0.15) {
        tok = argmax_row(t, V);
      } else if (r < 0.25) {
        tok = randint(rng, 0, V - 1);
      } else {
        tok = sample_dense(warped_dense(d, V, sd), uniform(rng));
      }
      c.tokens.push_back(tok);
    }
    trow += g + 1;
    drow += g;
  }
  return c;
}

ChainBatch batch_of(const ChainCase& c) {
  ChainBatch in;
  in.target = c.target.data();
  in.draft = c.draft.data();
  in.tokens = c.tokens.data();
  in.lengths = c.lengths.data();
  in.streams = c.streams.data();
  in.sampling = c.sampling.data();
  in.batch = c.B;
  in.vocab = c.V;
  in.seed = c.seed;
  return in;
}

// Runs c on one backend: its error message, or "" and (when asked) the accepted counts.
std::string run_chain(Backend& be, const ChainCase& c, std::vector<int32_t>* accepted = nullptr) {
  const ChainBatch in = batch_of(c);
  std::vector<int32_t> acc(c.B), tok(c.target.size() / c.V);
  ChainBatchOut o{acc.data(), tok.data()};
  try {
    be.verify_chain_batch(in, o);
  } catch (const Error& e) {
    return e.what();
  }
  if (accepted) *accepted = acc;
  return "";
}

// Runs one case on both backends; returns the number of sequences that differ.
int compare_chain(CudaBackend& g, const ChainCase& c, Fault fault = Fault::None) {
  const ChainBatch in = batch_of(c);
  size_t nt = 0;
  for (int l : c.lengths) nt += l + 1;
  std::vector<int32_t> acc_c(c.B), acc_g(c.B), tok_c(nt, -7), tok_g(nt, -7);
  ChainBatchOut oc{acc_c.data(), tok_c.data()}, og{acc_g.data(), tok_g.data()};
  cpu().verify_chain_batch(in, oc, fault);
  g.verify_chain_batch(in, og, fault);
  int bad = 0;
  size_t off = 0;
  for (int b = 0; b < c.B; ++b) {
    bool same = acc_c[b] == acc_g[b];
    for (int i = 0; same && i <= acc_c[b]; ++i) same = tok_c[off + i] == tok_g[off + i];
    if (!same && bad < 3)
      std::fprintf(stderr, "  chain mismatch V=%d g=%d %s: cpu accepted %d token %d, gpu accepted %d token %d\n", c.V,
                   c.lengths[b], sampling_str(c.sampling[b]).c_str(), acc_c[b], tok_c[off + acc_c[b]], acc_g[b],
                   acc_g[b] >= 0 ? tok_g[off + acc_g[b]] : -1);
    bad += !same;
    off += c.lengths[b] + 1;
  }
  return bad;
}

}  // namespace

// Runs f once with each shape of the blocked chain's per-block kernels (one CTA per block, one warp
// per block: the launch picks by size), then restores the launch's own choice.
template <class F>
void for_each_chain_shape(F f) {
  struct Restore {
    ~Restore() { cuda::set_split_units_per_sm(-1); }
  } restore;
  for (int units : {INT_MAX, 0}) {
    cuda::set_split_units_per_sm(units);
    f(units ? "one CTA per block" : "one warp per block");
  }
}

OSD_TEST(chain_batch_matches_cpu) {
  CudaBackend& g = gpu();
  for_each_chain_shape([&](const char* shape) {
    Rng rng(5);
    // 2049 and 6000: several blocks of the blocked scheme, the last one short.
    const int vocabs[] = {2, 3, 7, 50, 1000, 2049, 6000};
    long seqs = 0, bad = 0;
    for (int call = 0; call < 500; ++call) {
      ChainCase c = make_chain_case(rng, randint(rng, 1, 12), vocabs[call % 7], 8);
      bad += compare_chain(g, c);
      seqs += c.B;
    }
    std::printf("  chain (%s): %ld sequences, %ld differ\n", shape, seqs, bad);
    CHECK_EQ(bad, 0L);
  });
}

// Draft rows equal to the target rows and tokens outside the top-k / top-p support: every first
// draft token is rejected (q = 0) and the residual max(0, p - q) has no mass, so the correction
// falls back to sampling p (sparse rows: over the support list).
OSD_TEST(chain_residual_without_mass_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(15);
  long seqs = 0, bad = 0;
  for (int call = 0; call < 24; ++call) {
    const int V = call % 3 == 0 ? 32000 : 1000;
    ChainCase c = make_chain_case(rng, randint(rng, 1, 6), V, 4);
    c.draft.clear();
    size_t trow = 0;
    for (int b = 0; b < c.B; ++b) {
      Sampling& s = c.sampling[b];
      s.temperature = 1.0f;
      s.top_k = call % 2 ? 20 : 0;
      s.top_p = call % 2 ? 1.0f : 0.8f;
      for (int i = 0; i < c.lengths[b]; ++i)
        c.draft.insert(c.draft.end(), c.target.begin() + (trow + i) * V, c.target.begin() + (trow + i + 1) * V);
      trow += c.lengths[b] + 1;
    }
    for (auto& t : c.tokens) t = randint(rng, 0, V - 1);
    bad += compare_chain(g, c);
    seqs += c.B;
  }
  std::printf("  chain, residual without mass: %ld sequences, %ld differ\n", seqs, bad);
  CHECK_EQ(bad, 0L);
}

OSD_TEST(chain_batch_matches_cpu_large_vocab) {
  CudaBackend& g = gpu();
  for_each_chain_shape([&](const char* shape) {
    Rng rng(6);
    long seqs = 0, bad = 0;
    // 200000: more than 64 blocks a row, which finalize_row reads in a second pass.
    for (int call = 0; call < 14; ++call) {
      const int V = call >= 12 ? 200000 : call % 3 == 0 ? 32000 : 128256;
      ChainCase c = make_chain_case(rng, randint(rng, 2, 8), V, 8);
      bad += compare_chain(g, c);
      seqs += c.B;
    }
    std::printf("  chain, V in {32000, 128256, 200000} (%s): %ld sequences, %ld differ\n", shape, seqs, bad);
    CHECK_EQ(bad, 0L);
  });
}

OSD_TEST(chain_batch_faults_match_cpu) {
  CudaBackend& g = gpu();
  Rng rng(7);
  long bad = 0;
  for (int call = 0; call < 60; ++call) {
    ChainCase c = make_chain_case(rng, randint(rng, 1, 6), call % 2 ? 9 : 300, 4);
    bad += compare_chain(g, c, call % 2 ? Fault::ResidualNoClamp : Fault::ResidualFromTarget);
  }
  CHECK_EQ(bad, 0L);
}

OSD_TEST(chain_rejects_bad_rows_like_cpu) {
  CudaBackend& g = gpu();
  Rng rng(8);
  ChainCase c = make_chain_case(rng, 3, 40, 3);
  for (auto& s : c.sampling) s = Sampling();  // dense, so draft rows are read
  auto run = [&](Backend& be) { return run_chain(be, c); };
  const size_t nt = c.target.size() / c.V;
  c.target[(nt - 1) * c.V + 5] = std::nanf("");
  CHECK(run(cpu()) == run(g));
  CHECK(run(g).find("targetLogits row") != std::string::npos);
  c.target[(nt - 1) * c.V + 5] = 0.0f;
  if (!c.draft.empty()) {
    std::fill(c.draft.begin(), c.draft.begin() + c.V, -std::numeric_limits<float>::infinity());
    CHECK(run(cpu()) == run(g));
    CHECK(run(g).find("is all -Infinity") != std::string::npos);
  }
}

// Rows of several blocks, prepared block by block on the GPU: a NaN or +Infinity in a later block,
// and an all -Infinity row, must still be reported like the CPU (greedy and sampled). The clean case
// must accept the same counts.
OSD_TEST(chain_rejects_bad_rows_split_like_cpu) {
  CudaBackend& g = gpu();
  for_each_chain_shape([&](const char*) {
    Rng rng(18);
    for (int greedy = 0; greedy < 2; ++greedy) {
      // Rows of many blocks (65636 = 32 blocks + 100), each block reduced on its own.
      ChainCase c = make_chain_case(rng, 2, greedy ? 65636 : 6000, 3);
      for (auto& s : c.sampling) {
        s = Sampling();
        if (greedy) s.temperature = 0.0f;
      }
      // (Accepted counts only: compare_chain checks the tokens on many more cases.)
      auto run = [&](Backend& be, std::vector<int32_t>* out) { return run_chain(be, c, out); };
      std::vector<int32_t> oc, og;
      CHECK(run(cpu(), &oc) == run(g, &og));
      CHECK(oc == og);
      const size_t nt = c.target.size() / c.V;
      const float bad_values[] = {std::nanf(""), std::numeric_limits<float>::infinity()};
      for (float v : bad_values)
        for (int j : {100, 4100, c.V - 5}) {  // the first, third and last block of the last target row
          const size_t at = (nt - 1) * c.V + j;
          const float keep = c.target[at];
          c.target[at] = v;
          const std::string e = run(g, nullptr);
          CHECK(run(cpu(), nullptr) == e);
          CHECK(e.find("targetLogits row") != std::string::npos);
          c.target[at] = keep;
        }
      // Finite logits whose running sum overflows in one lane of a full block are not bad (the
      // block statistics' quick NaN / +Infinity check then reruns the exact one).
      {
        std::vector<float> keep(c.target.begin() + (nt - 1) * c.V, c.target.begin() + nt * c.V);
        for (int i = 0; i < 8; ++i) c.target[(nt - 1) * c.V + 32 * i] = 3.0e38f;
        std::vector<int32_t> oc2, og2;
        const std::string e = run(g, &og2);
        CHECK(e.empty());
        CHECK(run(cpu(), &oc2) == e);
        CHECK(oc2 == og2);
        std::copy(keep.begin(), keep.end(), c.target.begin() + (nt - 1) * c.V);
      }
      std::vector<float> keep(c.target.begin(), c.target.begin() + c.V);
      std::fill(c.target.begin(), c.target.begin() + c.V, -std::numeric_limits<float>::infinity());
      const std::string e = run(g, nullptr);
      CHECK(run(cpu(), nullptr) == e);
      CHECK(e.find("is all -Infinity") != std::string::npos);
      std::copy(keep.begin(), keep.end(), c.target.begin());
    }
  });
}

namespace {

struct TreeCase {
  std::vector<int32_t> parents, tokens, path_c, path_g, out_c, out_g;
  std::vector<float> target, draft;
  int n = 0, V = 0;
  Sampling s;
  TreeChildren mode = TreeChildren::WithReplacement;
  uint64_t stream = 0;
};

TreeCase make_tree_case(Rng& rng, int V, int nmax, int nmin = 1) {
  TreeCase t;
  t.V = V;
  t.n = randint(rng, nmin, nmax);
  t.s = random_sampling(rng, V);
  t.mode = static_cast<TreeChildren>(randint(rng, 0, 2));
  t.stream = rng();
  const int n = t.n;
  t.target.resize(static_cast<size_t>(n + 1) * V);
  t.draft.resize(t.target.size());
  const float scale = uniform(rng) < 0.5 ? 1.5f : 4.0f;
  const int style = randint(rng, 0, 5) % 3;
  const double noise = uniform(rng) < 0.5 ? 0.3 : 2.0;
  std::normal_distribution<float> nd(0.0f, static_cast<float>(noise));
  for (int r = 0; r <= n; ++r) {
    fill_logits(rng, &t.target[static_cast<size_t>(r) * V], V, scale, style);
    for (int j = 0; j < V; ++j) {
      const float x = t.target[static_cast<size_t>(r) * V + j];
      t.draft[static_cast<size_t>(r) * V + j] = std::isfinite(x) ? x + nd(rng) : x;
    }
  }
  // Shape: bushy near the root, then deeper chains.
  t.parents.resize(n);
  t.tokens.resize(n);
  for (int i = 0; i < n; ++i) t.parents[i] = i == 0 ? -1 : randint(rng, -1, i - 1) * (uniform(rng) < 0.3 ? 0 : 1) - (uniform(rng) < 0.15);
  for (int i = 0; i < n; ++i) t.parents[i] = std::max(-1, std::min(t.parents[i], i - 1));
  // Children tokens drawn as the mode assumes (from the parent's draft row), sometimes arbitrary.
  std::vector<std::vector<float>> q(n + 1);
  for (int i = 0; i < n; ++i) {
    const int row = t.parents[i] + 1;
    const float* d = &t.draft[static_cast<size_t>(row) * V];
    if (t.s.greedy() || t.mode == TreeChildren::Deterministic || uniform(rng) < 0.1) {
      t.tokens[i] = uniform(rng) < 0.5 ? argmax_row(&t.target[static_cast<size_t>(row) * V], V) : randint(rng, 0, V - 1);
      continue;
    }
    if (q[row].empty()) q[row] = warped_dense(d, V, t.s);
    t.tokens[i] = sample_dense(q[row], uniform(rng));
    if (t.mode == TreeChildren::WithoutReplacement) {
      q[row][t.tokens[i]] = 0.0f;
      if (std::accumulate(q[row].begin(), q[row].end(), 0.0) <= 0.0) q[row] = warped_dense(d, V, t.s);
    }
  }
  t.path_c.assign(n, -9);
  t.path_g.assign(n, -9);
  t.out_c.assign(n + 1, -9);
  t.out_g.assign(n + 1, -9);
  return t;
}

int compare_trees(CudaBackend& g, std::vector<TreeCase>& cases, uint64_t seed, Fault fault = Fault::None) {
  std::vector<TreeBatchItem> items(cases.size());
  std::vector<TreeResult> rc(cases.size());
  for (size_t r = 0; r < cases.size(); ++r) {
    TreeCase& t = cases[r];
    TreeInput in;
    in.parents = t.parents.data();
    in.tokens = t.tokens.data();
    in.n = t.n;
    in.target = t.target.data();
    in.draft = t.draft.data();
    in.vocab = t.V;
    rc[r] = cpu().verify_tree(in, t.s, t.mode, seed, t.stream, t.path_c.data(), t.out_c.data(), fault);
    items[r].in = in;
    items[r].sampling = t.s;
    items[r].mode = t.mode;
    items[r].stream = t.stream;
    items[r].path = t.path_g.data();
    items[r].out = t.out_g.data();
  }
  g.verify_tree_batch(items.data(), static_cast<int32_t>(items.size()), seed, fault);
  int bad = 0;
  for (size_t r = 0; r < cases.size(); ++r) {
    const TreeCase& t = cases[r];
    const TreeResult& a = rc[r];
    const TreeResult& b = items[r].result;
    bool same = a.path_len == b.path_len && a.emitted == b.emitted;
    for (int i = 0; same && i < a.path_len; ++i) same = t.path_c[i] == t.path_g[i];
    for (int i = 0; same && i < a.emitted; ++i) same = t.out_c[i] == t.out_g[i];
    if (!same && bad < 3)
      std::fprintf(stderr, "  tree mismatch V=%d n=%d mode=%d %s: cpu path %d last %d, gpu path %d last %d\n", t.V, t.n,
                   static_cast<int>(t.mode), sampling_str(t.s).c_str(), a.path_len, t.out_c[a.path_len], b.path_len,
                   b.emitted > 0 ? t.out_g[b.emitted - 1] : -1);
    bad += !same;
  }
  return bad;
}

}  // namespace

OSD_TEST(tree_batch_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(9);
  const int vocabs[] = {2, 5, 30, 400, 3000};
  long trees = 0, bad = 0;
  for (int call = 0; call < 250; ++call) {
    std::vector<TreeCase> cases;
    const int count = randint(rng, 1, 8);
    for (int r = 0; r < count; ++r) cases.push_back(make_tree_case(rng, vocabs[(call + r) % 5], call % 4 == 0 ? 64 : 12));
    bad += compare_trees(g, cases, rng());
    trees += count;
  }
  std::printf("  tree: %ld trees (3 children modes, greedy and sampled), %ld differ\n", trees, bad);
  CHECK_EQ(bad, 0L);
}

// The same random batches on each path, forced: row blocks that also walk, and (where no row is
// top-k / top-p) warp-prepared rows then the walks, whatever the batch's size.
OSD_TEST(tree_batch_matches_cpu_each_path) {
  CudaBackend& g = gpu();
  const int vocabs[] = {2, 5, 30, 400, 3000};
  for (const cuda::TreeLaunch mode : {cuda::TreeLaunch::OneKernel, cuda::TreeLaunch::Split}) {
    TreeLaunchMode forced(mode);
    Rng rng(19);
    long trees = 0, bad = 0, want_split = 0;
    const long split0 = cuda::tree_split_launches();
    for (int call = 0; call < 120; ++call) {
      std::vector<TreeCase> cases;
      const int count = randint(rng, 1, 6);
      bool sparse = false;
      for (int r = 0; r < count; ++r) {
        cases.push_back(make_tree_case(rng, vocabs[(call + r) % 5], call % 3 == 0 ? 64 : 12));
        const Sampling& s = cases.back().s;
        sparse |= !s.greedy() && ((s.top_k > 0 && s.top_k < cases.back().V) || s.top_p < 1.0f);
      }
      const Fault fault = call % 10 == 8 ? Fault::ResidualNoClamp : call % 10 == 9 ? Fault::ResidualFromTarget : Fault::None;
      bad += compare_trees(g, cases, rng(), fault);
      trees += count;
      want_split += mode == cuda::TreeLaunch::Split && !sparse;
    }
    const long split = cuda::tree_split_launches() - split0;
    std::printf("  tree, %s: %ld trees, %ld launches split, %ld differ\n",
                mode == cuda::TreeLaunch::Split ? "split forced" : "one kernel forced", trees, split, bad);
    CHECK_EQ(split, want_split);
    CHECK(mode == cuda::TreeLaunch::OneKernel || want_split > 10);  // enough batches without top-k / top-p
    CHECK_EQ(bad, 0L);
  }
}

// Trees larger than a block's staging arrays (n + 1 > 512: the walk reads the tree from global
// memory and tests every child on thread 0) and exactly at their size (n = 511).
OSD_TEST(tree_batch_matches_cpu_large_trees) {
  CudaBackend& g = gpu();
  Rng rng(20);
  long trees = 0, bad = 0;
  for (int call = 0; call < 8; ++call) {
    std::vector<TreeCase> cases;
    for (int r = 0; r < 2; ++r) {
      const int n = call % 2 ? 511 : 600 + 40 * call;
      cases.push_back(make_tree_case(rng, r ? 64 : 300, n, n));
    }
    bad += compare_trees(g, cases, rng(), call == 5 ? Fault::ResidualNoClamp : Fault::None);
    trees += 2;
  }
  std::printf("  tree, n in {511, 600 ..}: %ld trees, %ld differ\n", trees, bad);
  CHECK_EQ(bad, 0L);
}

OSD_TEST(tree_batch_matches_cpu_large_vocab) {
  CudaBackend& g = gpu();
  Rng rng(10);
  long trees = 0, bad = 0;
  for (int call = 0; call < 6; ++call) {
    std::vector<TreeCase> cases;
    for (int r = 0; r < 4; ++r) cases.push_back(make_tree_case(rng, call % 2 ? 128256 : 32000, 10));
    bad += compare_trees(g, cases, rng());
    trees += 4;
  }
  std::printf("  tree, V in {32000, 128256}: %ld trees, %ld differ\n", trees, bad);
  CHECK_EQ(bad, 0L);
}

// Batches of more rows than one wave of row blocks with no top-k / top-p row take the two-kernel
// path (one warp prepares each row, the exp terms are not stored, one block walks each request).
std::vector<TreeCase> many_row_trees(Rng& rng, int call) {
  const int vocabs[] = {5, 400, 3001, 32000};
  std::vector<TreeCase> cases;
  for (int r = 0; r < 6; ++r) {
    cases.push_back(make_tree_case(rng, vocabs[(call + r) % 4], 64));
    cases.back().s.top_k = 0;
    cases.back().s.top_p = 1.0f;
  }
  return cases;
}

OSD_TEST(tree_batch_matches_cpu_many_rows) {
  CudaBackend& g = gpu();
  Rng rng(14);
  long trees = 0, bad = 0, rows = 0, split = 0;
  for (int call = 0; call < 30; ++call) {
    std::vector<TreeCase> cases = many_row_trees(rng, call);
    const Fault fault = call % 6 == 4 ? Fault::ResidualFromTarget : call % 6 == 5 ? Fault::ResidualNoClamp : Fault::None;
    long call_rows = 0;  // sampled trees with drawn children have a draft row per target row
    for (const TreeCase& t : cases)
      call_rows += (t.s.greedy() || t.mode == TreeChildren::Deterministic ? 1 : 2) * static_cast<long>(t.n + 1);
    rows += call_rows;
    const long before = cuda::tree_split_launches();
    bad += compare_trees(g, cases, rng(), fault);
    const bool took = cuda::tree_split_launches() > before;
    split += took;
    // More rows than blocks in one wave (at most two row blocks per SM at this kernel's size) must split.
    if (call_rows > 2L * device_sm_count()) CHECK(took);
    trees += static_cast<long>(cases.size());
  }
  std::printf("  tree, batches of 6 (%ld rows in all, V up to 32000, no top-k / top-p): %ld trees, %ld launches split, %ld differ\n",
              rows, trees, split, bad);
  CHECK(split > 0);
  CHECK_EQ(bad, 0L);
}

OSD_TEST(tree_many_rows_rejects_bad_rows_like_cpu) {
  CudaBackend& g = gpu();
  Rng rng(15);
  std::vector<TreeCase> cases = many_row_trees(rng, 0);
  for (TreeCase& t : cases) t.s.temperature = 1.0f, t.mode = TreeChildren::WithReplacement;
  TreeCase& t = cases[3];
  const int V = t.V, n = t.n;
  std::vector<TreeBatchItem> items(cases.size());
  for (size_t r = 0; r < cases.size(); ++r) {
    TreeCase& c = cases[r];
    items[r].in.parents = c.parents.data();
    items[r].in.tokens = c.tokens.data();
    items[r].in.n = c.n;
    items[r].in.target = c.target.data();
    items[r].in.draft = c.draft.data();
    items[r].in.vocab = c.V;
    items[r].sampling = c.s;
    items[r].mode = c.mode;
    items[r].stream = c.stream;
    items[r].path = c.path_g.data();
    items[r].out = c.out_g.data();
  }
  auto run = [&](Backend& be, bool batch) -> std::string {
    try {
      if (batch) static_cast<CudaBackend&>(be).verify_tree_batch(items.data(), static_cast<int32_t>(items.size()), 5);
      else be.verify_tree(items[3].in, t.s, t.mode, 5, t.stream, t.path_c.data(), t.out_c.data());
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  t.draft[static_cast<size_t>(n / 2) * V + 1] = std::numeric_limits<float>::infinity();
  t.target[static_cast<size_t>(n) * V + V - 1] = std::nanf("");
  const std::string ec = run(cpu(), false), eg = run(g, true);
  CHECK(ec.find("draftLogits row " + std::to_string(n / 2)) != std::string::npos);
  CHECK(ec == eg);
  t.draft[static_cast<size_t>(n / 2) * V + 1] = 0.0f;
  for (int j = 0; j < V; ++j) t.target[static_cast<size_t>(n) * V + j] = -std::numeric_limits<float>::infinity();
  const std::string ec2 = run(cpu(), false), eg2 = run(g, true);
  CHECK(ec2.find("all -Infinity") != std::string::npos);
  CHECK(ec2 == eg2);
}

OSD_TEST(tree_faults_match_cpu) {
  CudaBackend& g = gpu();
  Rng rng(12);
  long bad = 0;
  for (int call = 0; call < 40; ++call) {
    std::vector<TreeCase> cases;
    for (int r = 0; r < 4; ++r) cases.push_back(make_tree_case(rng, 20, 10));
    bad += compare_trees(g, cases, rng(), call % 2 ? Fault::ResidualNoClamp : Fault::ResidualFromTarget);
  }
  CHECK_EQ(bad, 0L);
}

OSD_TEST(tree_rejects_bad_rows_like_cpu) {
  CudaBackend& g = gpu();
  const int V = 30, n = 4;
  Rng rng(13);
  std::vector<int32_t> parents = {-1, 0, 0, 1}, tokens = {1, 2, 3, 4}, path(n), out(n + 1);
  std::vector<float> target(static_cast<size_t>(n + 1) * V), draft(target.size());
  for (int r = 0; r <= n; ++r) {
    fill_logits(rng, &target[static_cast<size_t>(r) * V], V, 1.0f, 0);
    fill_logits(rng, &draft[static_cast<size_t>(r) * V], V, 1.0f, 0);
  }
  TreeInput in;
  in.parents = parents.data();
  in.tokens = tokens.data();
  in.n = n;
  in.target = target.data();
  in.draft = draft.data();
  in.vocab = V;
  auto run = [&](Backend& be) -> std::string {
    try {
      be.verify_tree(in, Sampling(), TreeChildren::WithReplacement, 1, 2, path.data(), out.data());
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  draft[2 * V + 3] = std::numeric_limits<float>::infinity();  // draft row 2 comes before target row 3
  target[3 * V + 1] = std::nanf("");
  const std::string ec = run(cpu()), eg = run(g);
  CHECK(ec.find("draftLogits row 2") != std::string::npos);
  CHECK(ec == eg);
  draft[2 * V + 3] = 0.0f;
  CHECK(run(cpu()) == run(g));
  CHECK(run(g).find("targetLogits row 3 contains NaN") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Exactness on the GPU: the first emitted token must follow the target's warped distribution.

namespace {

struct ChiModel {
  int V = 8;
  std::vector<float> p_logits, q_logits;  // 4 rows each (enough for g = 3)
};

ChiModel chi_model() {
  ChiModel m;
  const float p[] = {2.0f, 1.5f, 1.0f, 0.4f, 0.0f, -0.5f, -1.0f, -2.5f};
  const float q[] = {-1.0f, 0.5f, 2.2f, 1.0f, -0.3f, 0.8f, -2.0f, 0.1f};
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 8; ++j) m.p_logits.push_back(p[(j + r) % 8]), m.q_logits.push_back(q[(j + 3 * r) % 8]);
  return m;
}

double chain_first_token_p(CudaBackend& g, const Sampling& s, Fault fault, int N) {
  const ChiModel m = chi_model();
  const int V = m.V, G = 3;
  Rng rng(1000 + static_cast<int>(fault));
  std::vector<float> target, draft;
  std::vector<int32_t> tokens, lengths(N, G);
  std::vector<uint64_t> streams(N);
  std::vector<Sampling> samp(N, s);
  std::vector<std::vector<float>> qrows;
  for (int r = 0; r < G; ++r) qrows.push_back(warped_dense(&m.q_logits[r * V], V, s));
  for (int b = 0; b < N; ++b) {
    target.insert(target.end(), m.p_logits.begin(), m.p_logits.begin() + (G + 1) * V);
    draft.insert(draft.end(), m.q_logits.begin(), m.q_logits.begin() + G * V);
    for (int r = 0; r < G; ++r) tokens.push_back(sample_dense(qrows[r], uniform(rng)));
    streams[b] = static_cast<uint64_t>(b);
  }
  ChainBatch in;
  in.target = target.data();
  in.draft = draft.data();
  in.tokens = tokens.data();
  in.lengths = lengths.data();
  in.streams = streams.data();
  in.sampling = samp.data();
  in.batch = N;
  in.vocab = V;
  in.seed = 20241;
  std::vector<int32_t> acc(N), out(static_cast<size_t>(N) * (G + 1));
  ChainBatchOut o{acc.data(), out.data()};
  g.verify_chain_batch(in, o, fault);
  std::vector<long> counts(V, 0);
  for (int b = 0; b < N; ++b) counts[out[static_cast<size_t>(b) * (G + 1)]]++;
  auto p = warped_dense(m.p_logits.data(), V, s);
  return chi_square_p(counts, std::vector<double>(p.begin(), p.end()));
}

double tree_first_token_p(CudaBackend& g, const Sampling& s, TreeChildren mode, Fault fault, int N) {
  const ChiModel m = chi_model();
  const int V = m.V, n = 3;
  Rng rng(2000 + static_cast<int>(mode));
  std::vector<int32_t> parents = {-1, -1, -1};
  std::vector<std::vector<int32_t>> tokens(N, std::vector<int32_t>(n)), paths(N, std::vector<int32_t>(n)),
      outs(N, std::vector<int32_t>(n + 1));
  const auto q0 = warped_dense(m.q_logits.data(), V, s);
  std::vector<TreeBatchItem> items(N);
  for (int b = 0; b < N; ++b) {
    auto q = q0;
    for (int i = 0; i < n; ++i) {
      if (mode == TreeChildren::Deterministic) {
        tokens[b][i] = (i * 3 + 1) % V;
        continue;
      }
      tokens[b][i] = sample_dense(q, uniform(rng));
      if (mode == TreeChildren::WithoutReplacement) q[tokens[b][i]] = 0.0f;
    }
    TreeInput in;
    in.parents = parents.data();
    in.tokens = tokens[b].data();
    in.n = n;
    in.target = m.p_logits.data();
    in.draft = m.q_logits.data();
    in.vocab = V;
    items[b].in = in;
    items[b].sampling = s;
    items[b].mode = mode;
    items[b].stream = static_cast<uint64_t>(b);
    items[b].path = paths[b].data();
    items[b].out = outs[b].data();
  }
  g.verify_tree_batch(items.data(), N, 777, fault);
  std::vector<long> counts(V, 0);
  for (int b = 0; b < N; ++b) counts[outs[b][0]]++;
  auto p = warped_dense(m.p_logits.data(), V, s);
  return chi_square_p(counts, std::vector<double>(p.begin(), p.end()));
}

}  // namespace

OSD_TEST(chi_square_exactness_on_gpu) {
  CudaBackend& g = gpu();
  const int N = 40000;
  Sampling dense;
  dense.temperature = 0.9f;
  Sampling topk;
  topk.top_k = 5;
  Sampling topp;
  topp.temperature = 1.2f;
  topp.top_p = 0.8f;
  for (const Sampling& s : {dense, topk, topp}) {
    const double pc = chain_first_token_p(g, s, Fault::None, N);
    std::printf("  chain %s: p = %.4g\n", sampling_str(s).c_str(), pc);
    CHECK(pc > 1e-3);
    for (auto mode : {TreeChildren::WithReplacement, TreeChildren::WithoutReplacement, TreeChildren::Deterministic}) {
      const double pt = tree_first_token_p(g, s, mode, Fault::None, N);
      std::printf("  tree mode %d %s: p = %.4g\n", static_cast<int>(mode), sampling_str(s).c_str(), pt);
      CHECK(pt > 1e-3);
    }
  }
  // Power: the same harness rejects planted residual bugs.
  const double f1 = chain_first_token_p(g, dense, Fault::ResidualFromTarget, N);
  const double f2 = chain_first_token_p(g, dense, Fault::ResidualNoClamp, N);
  const double f3 = tree_first_token_p(g, dense, TreeChildren::WithReplacement, Fault::ResidualNoClamp, N);
  std::printf("  planted faults: p = %.3g, %.3g, %.3g\n", f1, f2, f3);
  CHECK(f1 < 1e-6);
  CHECK(f2 < 1e-6);
  CHECK(f3 < 1e-6);
}

// ---------------------------------------------------------------------------------------------

// The row kernels (one CTA per row, double per entry); the blocked default for reverse KL, JSD and
// TVD is held to the CPU's blocked path in distill_blocked_divergence_matches_cpu.
OSD_TEST(distill_matches_cpu) {
  CudaBackend& g = gpu();
  BlockedDivergence row_kernels(false);
  Rng rng(14);
  int cases = 0, bad = 0;
  for (int kind = 0; kind < 4; ++kind)
    for (int sparse = 0; sparse < 2; ++sparse)
      for (int V : {11, 1000, 5000, 32000}) {
        const int rows = V == 32000 ? 3 : 6;
        const int k = sparse ? std::min(V, randint(rng, 1, 50)) : 0;
        std::vector<float> s(static_cast<size_t>(rows) * V), t(s.size()), probs(static_cast<size_t>(rows) * k), res(rows);
        std::vector<int32_t> ids(static_cast<size_t>(rows) * k);
        std::vector<uint8_t> mask(rows);
        for (int r = 0; r < rows; ++r) {
          fill_logits(rng, &s[static_cast<size_t>(r) * V], V, 2.0f, 0);
          fill_logits(rng, &t[static_cast<size_t>(r) * V], V, 2.0f, 0);
          mask[r] = r % 3 != 1;
          std::vector<int32_t> perm(V);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), rng);
          double total = 0.0;
          for (int i = 0; i < k; ++i) {
            ids[static_cast<size_t>(r) * k + i] = perm[i];
            probs[static_cast<size_t>(r) * k + i] = static_cast<float>(uniform(rng) + 0.05);
            total += probs[static_cast<size_t>(r) * k + i];
          }
          const double keep = k == V ? 1.0 : 0.4 + 0.5 * uniform(rng);
          for (int i = 0; i < k; ++i) probs[static_cast<size_t>(r) * k + i] = static_cast<float>(probs[static_cast<size_t>(r) * k + i] / total * keep);
          res[r] = static_cast<float>(1.0 - keep);
        }
        for (int variant = 0; variant < 2; ++variant) {
          DistillInput in;
          in.kind = static_cast<DistillKind>(kind);
          in.student = s.data();
          in.rows = rows;
          in.vocab = V;
          in.temperature = variant ? 1.7f : 1.0f;
          in.beta = 0.3f;
          in.mask = variant ? mask.data() : nullptr;
          if (sparse) {
            in.topk_ids = ids.data();
            in.topk_probs = probs.data();
            in.residual = variant ? nullptr : res.data();
            in.k = k;
          } else {
            in.teacher = t.data();
          }
          // Forward KL, dense teacher: both backends run the blocked scheme operation for operation.
          // The other losses against the reference, which the GPU mirrors.
          const bool exact = kind == static_cast<int>(DistillKind::ForwardKL) && !sparse;
          std::vector<float> gc(s.size()), gg(s.size(), 123.0f);
          const double lc = exact ? cpu().distill_loss(in, gc.data()) : reference_distill_loss(in, gc.data());
          const double lg = g.distill_loss(in, gg.data());
          float gmax = 0.0f;
          for (float x : gc) gmax = std::max(gmax, std::fabs(x));
          int gbad = 0;
          for (size_t j = 0; j < gc.size(); ++j)
            gbad += exact ? std::memcmp(&gc[j], &gg[j], sizeof(float)) != 0
                          : !(std::fabs(gc[j] - gg[j]) <= 1e-6 * gmax + 1e-5 * std::fabs(gc[j]));
          const bool lbad = !(std::fabs(lc - lg) <= (exact ? 1e-12 : 2e-5) * std::max(1.0, std::fabs(lc)));
          if ((gbad || lbad) && bad < 5)
            std::fprintf(stderr, "  distill kind %d sparse %d V %d T %g: loss %.9g vs %.9g, %d grads off\n", kind, sparse, V,
                         in.temperature, lc, lg, gbad);
          bad += gbad || lbad;
          ++cases;
        }
      }
  std::printf("  distill: %d cases (4 losses x dense/sparse x masks), %d differ\n", cases, bad);
  CHECK_EQ(bad, 0);
  // A sparse teacher over the whole vocabulary (k = V) whose probabilities sum to 1 only up to
  // float rounding, without residual: the leftover is rounding, not mass outside the top-k. (The
  // GPU once kept it, which gave the empty "rest" bin teacher mass and forward KL an infinite loss.)
  for (int kind = 0; kind < 4; ++kind) {
    const int V = 11, rows = 2;
    std::vector<float> s(rows * V), probs(rows * V);
    std::vector<int32_t> ids(rows * V);
    for (int r = 0; r < rows; ++r) {
      fill_logits(rng, &s[r * V], V, 2.0f, 0);
      double total = 0.0;
      for (int i = 0; i < V; ++i) ids[r * V + i] = (i * 7 + r) % V, total += (probs[r * V + i] = static_cast<float>(uniform(rng) + 0.1));
      for (int i = 0; i < V; ++i) probs[r * V + i] = static_cast<float>(probs[r * V + i] / total * (1.0 - 3e-7));
    }
    DistillInput in;
    in.kind = static_cast<DistillKind>(kind);
    in.student = s.data();
    in.rows = rows;
    in.vocab = V;
    in.temperature = 1.7f;
    in.topk_ids = ids.data();
    in.topk_probs = probs.data();
    in.k = V;
    std::vector<float> gc(s.size()), gg(s.size());
    const double lc = reference_distill_loss(in, gc.data()), lg = g.distill_loss(in, gg.data());
    CHECK(std::isfinite(lc));
    CHECK(std::isfinite(lg));
    CHECK_NEAR(lg, lc, 2e-5 * std::max(1.0, std::fabs(lc)));
  }
  // Non-finite student logits: the same error as the CPU.
  std::vector<float> s(2 * 5, 0.5f), t(2 * 5, 0.25f);
  s[7] = std::numeric_limits<float>::infinity();
  DistillInput in;
  in.student = s.data();
  in.teacher = t.data();
  in.rows = 2;
  in.vocab = 5;
  std::string ec, eg;
  try { cpu().distill_loss(in, nullptr); } catch (const Error& e) { ec = e.what(); }
  try { g.distill_loss(in, nullptr); } catch (const Error& e) { eg = e.what(); }
  CHECK(!ec.empty());
  CHECK(ec == eg);
}

// A forward-KL input with a dense teacher.
DistillInput forward_kl_input(const std::vector<float>& s, const std::vector<float>& t, int rows, int V) {
  DistillInput in;
  in.kind = DistillKind::ForwardKL;
  in.student = s.data();
  in.teacher = t.data();
  in.rows = rows;
  in.vocab = V;
  return in;
}

// Student and teacher rows of normal logits (scale 2); student row `tie_row` has ties.
void fill_student_teacher(Rng& rng, std::vector<float>& s, std::vector<float>& t, int rows, int V, int tie_row) {
  for (int r = 0; r < rows; ++r) {
    fill_logits(rng, &s[static_cast<size_t>(r) * V], V, 2.0f, r == tie_row ? 1 : 0);
    fill_logits(rng, &t[static_cast<size_t>(r) * V], V, 2.0f, 0);
  }
}

// Student logits of +-1e4 against a sparse teacher: the student mass outside the top-k is
// exp(-2e4) relative to the row max, so both backends sum it relative to the largest logit
// outside the top-k (losses.cpp), and loss and gradient stay finite.
OSD_TEST(distill_sparse_teacher_extreme_logits_match_cpu) {
  CudaBackend& g = gpu();
  Rng rng(16);
  int cases = 0, bad = 0;
  for (int kind = 0; kind < 4; ++kind)
    for (int V : {50, 1000, 5000}) {
      const int rows = 3, k = 8;
      std::vector<float> s(static_cast<size_t>(rows) * V), probs(static_cast<size_t>(rows) * k), res(rows);
      std::vector<int32_t> ids(static_cast<size_t>(rows) * k);
      for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < V; ++j) s[static_cast<size_t>(r) * V + j] = (uniform(rng) < 0.2 ? 1e4f : -1e4f) + static_cast<float>(uniform(rng));
        std::vector<int32_t> perm(V);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int i = 0; i < k; ++i) {
          ids[static_cast<size_t>(r) * k + i] = perm[i];
          probs[static_cast<size_t>(r) * k + i] = 0.1f;
        }
        res[r] = 0.2f;
      }
      DistillInput in;
      in.kind = static_cast<DistillKind>(kind);
      in.student = s.data();
      in.rows = rows;
      in.vocab = V;
      in.temperature = 1.0f;
      in.beta = 0.5f;
      in.topk_ids = ids.data();
      in.topk_probs = probs.data();
      in.residual = res.data();
      in.k = k;
      std::vector<float> gc(s.size()), gg(s.size(), 123.0f);
      const double lc = reference_distill_loss(in, gc.data());
      const double lg = g.distill_loss(in, gg.data());
      float gmax = 0.0f;
      for (float x : gc) gmax = std::max(gmax, std::fabs(x));
      int gbad = 0;
      for (size_t j = 0; j < gc.size(); ++j)
        gbad += !(std::isfinite(gg[j]) && std::fabs(gc[j] - gg[j]) <= 1e-6 * gmax + 1e-5 * std::fabs(gc[j]));
      const bool lbad = !(std::isfinite(lg) && std::fabs(lc - lg) <= 2e-5 * std::max(1.0, std::fabs(lc)));
      if ((gbad || lbad) && bad < 5)
        std::fprintf(stderr, "  distill kind %d V %d, logits +-1e4: loss %.9g vs %.9g, %d grads off\n", kind, V, lc, lg, gbad);
      bad += gbad || lbad;
      ++cases;
    }
  std::printf("  distill, sparse teacher, student logits +-1e4: %d cases, %d differ\n", cases, bad);
  CHECK_EQ(bad, 0);
}

// Rows with NaN (student, row 1) and/or +Infinity (teacher, row 1) logits against a dense teacher:
// the GPU throws the CPU's error (the student's row reported before the teacher's).
void check_bad_rows_like_cpu(CudaBackend& g, Rng& rng, DistillKind kind, int V) {
  const int rows = 2;
  for (int which = 0; which < 3; ++which) {
    std::vector<float> s(static_cast<size_t>(rows) * V), t(s.size());
    fill_student_teacher(rng, s, t, rows, V, -1);
    if (which != 1) s[V + V * 7 / 8] = std::nanf("");
    if (which != 0) t[V + 5] = std::numeric_limits<float>::infinity();
    DistillInput in = forward_kl_input(s, t, rows, V);
    in.kind = kind;
    std::vector<float> gc(s.size()), gg(s.size());
    std::string ec, eg;
    try { cpu().distill_loss(in, gc.data()); } catch (const Error& e) { ec = e.what(); }
    try { g.distill_loss(in, gg.data()); } catch (const Error& e) { eg = e.what(); }
    if (ec != eg) std::fprintf(stderr, "  bad row case %d: cpu '%s' gpu '%s'\n", which, ec.c_str(), eg.c_str());
    CHECK(!ec.empty());
    CHECK(ec == eg);
  }
}

// Forward KL against a dense teacher on the one-pass path (sm_90: one thread-block cluster per row,
// up to 16 CTAs at V = 128256) and on the fallback (V % 4 != 0): bit-identical gradients, the loss
// alone without a gradient, and bad rows reported like the CPU (student before teacher).
OSD_TEST(distill_forward_kl_large_vocab_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(24);
  int cases = 0, bad = 0;
  for (int V : {2052, 32000, 128256, 131076, 128257})
    for (float T : {1.0f, 1.7f, 0.4f}) {
      const int rows = 3;
      std::vector<float> s(static_cast<size_t>(rows) * V), t(s.size());
      std::vector<uint8_t> mask = {1, 0, 1};
      fill_student_teacher(rng, s, t, rows, V, 2);
      for (int variant = 0; variant < 2; ++variant) {
        DistillInput in = forward_kl_input(s, t, rows, V);
        in.temperature = T;
        in.mask = variant ? mask.data() : nullptr;
        std::vector<float> gc(s.size()), gg(s.size(), 123.0f);
        const double lc = cpu().distill_loss(in, gc.data()), lg = g.distill_loss(in, gg.data());
        const double l0 = g.distill_loss(in, nullptr);  // loss only
        const int gbad = std::memcmp(gc.data(), gg.data(), gc.size() * sizeof(float)) != 0;
        const double tol = 1e-12 * std::max(1.0, std::fabs(lc));
        const bool lbad = !(std::fabs(lc - lg) <= tol) || !(std::fabs(lc - l0) <= tol);
        if ((gbad || lbad) && bad < 5)
          std::fprintf(stderr, "  forward KL V %d T %g mask %d: loss %.12g vs %.12g (alone %.12g), grads %s\n", V, T,
                       variant, lc, lg, l0, gbad ? "differ" : "same");
        bad += gbad || lbad;
        ++cases;
      }
    }
  std::printf("  forward KL, dense teacher, V up to 131076: %d cases, %d differ\n", cases, bad);
  CHECK_EQ(bad, 0);
  // Bad rows on the one-pass path: the CPU's error, student rows reported before teacher rows.
  check_bad_rows_like_cpu(g, rng, DistillKind::ForwardKL, 32000);
}

// The cluster kernels with every CTA shape (set_cluster_warps: W blocks per CTA, C = nb / W CTAs per
// cluster): the blocks are combined in block order whatever the shape, so loss and gradient must
// have the default shape's bits (which the tests above hold to the CPU).
OSD_TEST(distill_cluster_shapes_give_the_same_bits) {
  CudaBackend& g = gpu();
  if (!cuda::cluster_kernels_built() || device_cc_major() < 9) throw Skip{"no sm_90 cluster kernels on this device"};
  BlockedDivergence blocked(true);
  ClusterDivergence one_pass(true);
  struct Warps {
    ~Warps() { cuda::set_cluster_warps(0); }
  } restore;
  Rng rng(41);
  int cases = 0, bad = 0;
  for (int V : {6000, 32000, 128256})
    for (DistillKind kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
      const int rows = 5;
      std::vector<float> s(static_cast<size_t>(rows) * V), t(s.size());
      std::vector<uint8_t> mask = {1, 1, 0, 1, 1};
      fill_student_teacher(rng, s, t, rows, V, 2);
      DistillInput in = forward_kl_input(s, t, rows, V);
      in.kind = kind;
      in.temperature = V == 32000 ? 1.0f : 1.3f;
      in.mask = mask.data();
      cuda::set_cluster_warps(0);
      std::vector<float> g0(s.size(), 123.0f);
      const double l0 = g.distill_loss(in, g0.data());
      for (int w : {1, 2, 3, 8, 12}) {
        cuda::set_cluster_warps(w);
        const long long before = cuda::cluster_launches();
        std::vector<float> gw(s.size(), -7.0f);
        const double lw = g.distill_loss(in, gw.data());
        const bool differ = std::memcmp(&l0, &lw, sizeof l0) != 0 ||
                            std::memcmp(g0.data(), gw.data(), g0.size() * sizeof(float)) != 0;
        if (differ && bad < 5)
          std::fprintf(stderr, "  kind %d V %d warps %d: loss %.17g vs %.17g, grads %s\n", static_cast<int>(kind), V, w,
                       l0, lw, std::memcmp(g0.data(), gw.data(), g0.size() * sizeof(float)) ? "differ" : "same");
        bad += differ;
        CHECK_EQ(cuda::cluster_launches() - before, 1LL);  // the cluster kernel ran with this shape
        ++cases;
      }
    }
  std::printf("  cluster shapes (1-12 warps per CTA), 4 losses, V in {6000, 32000, 128256}: %d cases, %d differ\n",
              cases, bad);
  CHECK_EQ(bad, 0);
}

// Reverse KL, JSD and TVD against a dense teacher on the blocked kernels (set_blocked_divergence),
// against the CPU's blocked path (divergence_row_blocked), which they follow operation for
// operation per entry; sums over a block run in another order and JSD's log differs (logf against
// the CPU's polynomial). Tolerances, as test_kernels' fast-path check: loss 1e-5 * max(1, |loss|);
// gradient 1e-6 max|g| + 1e-5 |g_j| + 1e-5 of its terms' size, gscale q_j (1 + |log q_j|, + 27.7
// for reverse KL). Also the loss alone, masks, logits of +-1e4 and bad rows. Both ways: the three
// kernels, and the one-pass cluster kernel (set_cluster_divergence; it runs on sm_90 for rows with
// V % 4 == 0, which most cases here have).
OSD_TEST(distill_blocked_divergence_matches_cpu) {
  for (bool cluster : {false, true}) {
    CudaBackend& g = gpu();
    BlockedDivergence blocked(true);
    ClusterDivergence one_pass(cluster);
    const long long launches_before = cuda::cluster_launches();
    Rng rng(31);
    int cases = 0, bad = 0, eligible = 0, same_bits = 0;
    double worst_loss = 0.0, worst_grad = 0.0;
    auto compare = [&](const DistillInput& in, const char* what) {
      const int V = in.vocab, rows = in.rows;
      eligible += V % 4 == 0;  // rows the cluster kernel takes (aligned bulk copies)
      const size_t n = static_cast<size_t>(rows) * V;
      std::vector<float> gc(n), gg(n, 123.0f);
      const double lc = cpu().distill_loss(in, gc.data()), lg = g.distill_loss(in, gg.data());
      const double l0 = g.distill_loss(in, nullptr);
      float gmax = 0.0f;
      for (float x : gc) gmax = std::max(gmax, std::fabs(x));
      int counted = 0;
      for (int r = 0; r < rows; ++r) counted += !in.mask || in.mask[r];
      const double gs = counted ? 1.0 / counted / in.temperature : 0.0;
      double gerr = 0.0;
      for (int r = 0; r < rows; ++r) {
        const float* s = in.student + static_cast<size_t>(r) * V;
        double mx = s[0], z = 0.0;
        for (int j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(s[j]));
        for (int j = 0; j < V; ++j) z += std::exp((s[j] - mx) / in.temperature);
        for (int j = 0; j < V; ++j) {
          const size_t i = static_cast<size_t>(r) * V + j;
          const double lq = (s[j] - mx) / in.temperature - std::log(z);
          const double term = gs * std::exp(lq) * (1.0 - lq + (in.kind == DistillKind::ReverseKL ? 27.7 : 0.0));
          const double tol = 1e-6 * gmax + 1e-5 * std::fabs(gc[i]) + 1e-5 * term;
          gerr = std::max(gerr, std::fabs(static_cast<double>(gg[i]) - gc[i]) / (tol > 0.0 ? tol : 1e-30));
        }
      }
      const double lerr = std::fabs(lg - lc) / (1e-5 * std::max(1.0, std::fabs(lc)));
      const bool alone_ok = l0 == lg;  // the same kernels make the loss with or without a gradient
      same_bits += lc == lg && std::memcmp(gc.data(), gg.data(), n * sizeof(float)) == 0;
      worst_loss = std::max(worst_loss, lerr);
      worst_grad = std::max(worst_grad, gerr);
      const bool fail = !(lerr <= 1.0) || !(gerr <= 1.0) || !alone_ok;
      if (fail && bad < 5)
        std::fprintf(stderr, "  blocked%s %s kind %d V %d T %g: loss %.9g vs %.9g (alone %.9g), grad err %.3g of tol\n",
                     cluster ? " (cluster)" : "", what, static_cast<int>(in.kind), V, in.temperature, lc, lg, l0, gerr);
      bad += fail;
      ++cases;
    };
    for (DistillKind kind : {DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD})
      for (int V : {11, 1000, 2048, 2049, 5000, 32000, 128256})
        for (int shape = 0; shape < 3; ++shape) {
          // shape 0: unrelated rows; 1: larger logits, beta 0.1; 2: a student close to its teacher.
          const int rows = V >= 32000 ? 2 : 4;
          std::vector<float> s(static_cast<size_t>(rows) * V), t(s.size());
          for (int r = 0; r < rows; ++r) {
            fill_logits(rng, &t[static_cast<size_t>(r) * V], V, shape == 1 ? 4.0f : 2.0f, 0);
            fill_logits(rng, &s[static_cast<size_t>(r) * V], V, shape == 1 ? 4.0f : 2.0f, 0);
            if (shape == 2)
              for (int j = 0; j < V; ++j) {
                const size_t i = static_cast<size_t>(r) * V + j;
                s[i] = t[i] + 0.01f * s[i] + 3.0f;
              }
          }
          std::vector<uint8_t> mask(rows);
          for (int r = 0; r < rows; ++r) mask[r] = r % 2 == 0;
          DistillInput in;
          in.kind = kind;
          in.student = s.data();
          in.teacher = t.data();
          in.rows = rows;
          in.vocab = V;
          in.beta = shape == 1 ? 0.1f : 0.5f;
          in.temperature = shape == 0 ? 1.0f : shape == 1 ? 0.5f : 1.7f;
          in.mask = shape == 1 ? mask.data() : nullptr;
          compare(in, "random");
        }
    // Logits of +-1e4 (losses.cpp's extreme-logit case): finite, and as the CPU.
    {
      std::vector<float> s = {1e4f, -1e4f, 0.f, 5e3f, -5e3f, 1e4f - 1.f}, t = {-1e4f, 1e4f, 0.f, 1e4f - 2.f, 3.f, -1e4f};
      for (DistillKind kind : {DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
        DistillInput in;
        in.kind = kind;
        in.student = s.data();
        in.teacher = t.data();
        in.rows = 1;
        in.vocab = 6;
        compare(in, "+-1e4");
      }
    }
    const long long launched = cuda::cluster_launches() - launches_before;
    // same_bits: cases whose loss and gradient equal the CPU's bit for bit (informative: the cluster
    // kernel sums as the CPU does, but log() may differ in the last bit).
    std::printf("  blocked reverse KL / JSD / TVD%s: %d cases, %d differ, %d bit-identical; worst loss %.3f, grad %.3f of "
                "tolerance; %lld cluster launches\n",
                cluster ? " (cluster kernel on)" : "", cases, bad, same_bits, worst_loss, worst_grad, launched);
    CHECK_EQ(bad, 0);
    // Every eligible case took the cluster kernel, twice (with and without a gradient), when it is on
    // and this build has sm_90 code for the device; none otherwise.
    const bool runs = cluster && cuda::cluster_kernels_built() && device_cc_major() >= 9;
    CHECK_EQ(launched, runs ? 2LL * eligible : 0LL);
    // Bad rows: the CPU's error, student rows before teacher rows; at V = 128256 the NaN lies in a
    // CTA of the cluster other than the teacher's Infinity.
    check_bad_rows_like_cpu(g, rng, DistillKind::JSD, 5000);
    check_bad_rows_like_cpu(g, rng, DistillKind::ReverseKL, 128256);
  }
}

OSD_TEST(adamw_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(15);
  const size_t n = 100003;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> p(n), gr(n), m(n), v(n);
  for (size_t i = 0; i < n; ++i) p[i] = nd(rng), m[i] = 0.1f * nd(rng), v[i] = std::fabs(0.01f * nd(rng));
  auto pc = p, mc = m, vc = v;
  AdamWConfig c;
  c.lr = 1e-3f;
  c.weight_decay = 0.01f;
  c.grad_scale = 0.7f;
  long exact = 0, off = 0;
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < n; ++i) gr[i] = nd(rng);
    c.step = step;
    cpu().adamw_step(pc.data(), gr.data(), mc.data(), vc.data(), n, c);
    g.adamw_step(p.data(), gr.data(), m.data(), v.data(), n, c);
    for (size_t i = 0; i < n; ++i) {
      const bool same = p[i] == pc[i] && m[i] == mc[i] && v[i] == vc[i];
      exact += same;
      off += !(std::fabs(p[i] - pc[i]) <= 1e-6f * std::fabs(pc[i]) + 1e-9f) ||
             !(std::fabs(m[i] - mc[i]) <= 1e-6f * std::fabs(mc[i]) + 1e-9f) ||
             !(std::fabs(v[i] - vc[i]) <= 1e-6f * std::fabs(vc[i]) + 1e-12f);
    }
  }
  std::printf("  adamw: %ld of %zu updates bit-identical\n", exact, 3 * n);
  CHECK_EQ(off, 0L);
}

OSD_TEST(global_norm_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(16);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (size_t n : {size_t(0), size_t(1), size_t(65537), size_t(1000003)}) {
    std::vector<float> x(n);
    for (auto& e : x) e = nd(rng);
    const double a = cpu().global_norm(x.data(), n), b = g.global_norm(x.data(), n);
    CHECK_NEAR(a, b, 1e-12 * std::max(1.0, a));
  }
}

OSD_TEST(tree_mask_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(17);
  int bad = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int n = randint(rng, 1, 130), base = randint(rng, 0, 1000), words = (n + 31) / 32 + trial % 2;
    std::vector<int32_t> parents(n), pos(n), pos_g(n);
    for (int i = 0; i < n; ++i) parents[i] = randint(rng, -1, i - 1);
    // model/sequence.cpp: pos[i] = base + depth(i); token i sees its ancestors and itself.
    std::vector<std::vector<int32_t>> visible(n);
    std::vector<uint32_t> mask(static_cast<size_t>(n) * words, 0u), mask_g(mask.size(), 0xdeadbeefu);
    for (int i = 0; i < n; ++i) {
      const int p = parents[i];
      pos[i] = base + (p < 0 ? 0 : pos[p] - base + 1);
      if (p >= 0) visible[i] = visible[p];
      visible[i].push_back(i);
      for (int j : visible[i]) mask[static_cast<size_t>(i) * words + (j >> 5)] |= 1u << (j & 31);
    }
    g.tree_mask(parents.data(), n, base, pos_g.data(), mask_g.data(), words);
    bad += pos != pos_g || mask != mask_g;
  }
  CHECK_EQ(bad, 0);
}

OSD_TEST(kv_keep_path_matches_cpu) {
  CudaBackend& g = gpu();
  Rng rng(18);
  int bad = 0;
  for (int trial = 0; trial < 100; ++trial) {
    const int n = randint(rng, 1, 64), base = randint(rng, 0, 40), kvd = randint(rng, 1, 300);
    const int slots = base + n + randint(rng, 0, 5);
    std::vector<int32_t> parents(n);
    for (int i = 0; i < n; ++i) parents[i] = randint(rng, -1, i - 1);
    // A root-to-node path of the tree, as verification returns it.
    std::vector<int32_t> path;
    for (int j = randint(rng, 0, n - 1); j >= 0; j = parents[j]) path.push_back(j);
    std::reverse(path.begin(), path.end());
    std::vector<float> k(static_cast<size_t>(slots) * kvd), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>(i), v[i] = -static_cast<float>(i);
    auto kc = k, vc = v;
    // Sequence::keep_path.
    for (size_t i = 0; i < path.size(); ++i) {
      const int src = base + path[i];
      if (src == base + static_cast<int>(i)) continue;
      std::memcpy(&kc[(base + i) * kvd], &kc[static_cast<size_t>(src) * kvd], kvd * sizeof(float));
      std::memcpy(&vc[(base + i) * kvd], &vc[static_cast<size_t>(src) * kvd], kvd * sizeof(float));
    }
    g.kv_keep_path(k.data(), v.data(), slots, kvd, base, path.data(), static_cast<int32_t>(path.size()));
    bad += k != kc || v != vc;
  }
  CHECK_EQ(bad, 0);
}

// ---- The model pass ----

OSD_TEST(model_matmul_matches_cpu) {
  gpu();
  using gguf::TensorType;
  Rng rng(41);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  int bits_bad = 0, tol_bad = 0, cases = 0;
  for (TensorType t : {TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::F32, TensorType::F16,
                       TensorType::BF16, TensorType::Q5_0}) {
    const bool int8 = t == TensorType::Q8_0 || t == TensorType::Q4_0 || t == TensorType::Q4_1;
    for (auto [rows, cols] : {std::pair<int, int>{37, 64}, {300, 576}, {5, 4096}, {129, 1536}}) {
      for (int n : {1, 3, 9}) {
        std::vector<float> wf(static_cast<size_t>(rows) * cols), x(static_cast<size_t>(n) * cols);
        for (auto& v : wf) v = nd(rng) * 0.05f;
        for (auto& v : x) v = nd(rng);
        const size_t rb = quant::bytes_for(t, cols);
        std::vector<uint8_t> wb(rb * rows);
        for (int r = 0; r < rows; ++r) quant::quantize(t, &wf[static_cast<size_t>(r) * cols], cols, &wb[r * rb]);
        Matrix m;
        m.type = t, m.rows = rows, m.cols = cols, m.data = wb.data(), m.row_bytes = rb;
        std::vector<float> yc(static_cast<size_t>(n) * rows), yg(yc.size());
        cuda::model_matmul(m, x.data(), n, yg.data());
        ++cases;
        if (int8) {  // the CPU's vector kernels and its portable reference: the same bits
          for (bool ref : {false, true}) {
            if (ref) matmul_reference(m, x.data(), n, yc.data(), KernelIsa::Portable);
            else matmul(m, x.data(), n, yc.data());
            for (size_t i = 0; i < yc.size(); ++i) bits_bad += std::memcmp(&yc[i], &yg[i], sizeof(float)) != 0;
          }
        } else {
          std::vector<float> row(cols);
          for (int r = 0; r < rows; ++r) {
            dequantize_row(m, r, row.data());
            for (int k = 0; k < n; ++k) {
              double ref = 0, mag = 0;
              for (int j = 0; j < cols; ++j)
                ref += double(row[j]) * x[size_t(k) * cols + j], mag += std::fabs(double(row[j]) * x[size_t(k) * cols + j]);
              tol_bad += !(std::fabs(yg[size_t(k) * rows + r] - ref) <= 1e-5 * mag + 1e-6);
            }
          }
        }
      }
    }
  }
  // A block with a NaN: the CPU's activation quantiser makes its scale NaN, so every output is NaN.
  {
    const int rows = 8, cols = 64;
    std::vector<float> wf(rows * cols, 0.01f), x(cols, 1.0f);
    x[40] = NAN;
    std::vector<uint8_t> wb(quant::bytes_for(TensorType::Q4_1, cols) * rows);
    for (int r = 0; r < rows; ++r) quant::quantize(TensorType::Q4_1, &wf[r * cols], cols, &wb[r * (wb.size() / rows)]);
    Matrix m;
    m.type = TensorType::Q4_1, m.rows = rows, m.cols = cols, m.data = wb.data(), m.row_bytes = wb.size() / rows;
    std::vector<float> yc(rows), yg(rows);
    matmul(m, x.data(), 1, yc.data());
    cuda::model_matmul(m, x.data(), 1, yg.data());
    for (int r = 0; r < rows; ++r) CHECK(std::isnan(yc[r]) && std::isnan(yg[r]));
  }
  std::printf("  %d products: %d outputs differ in bits (int8 types), %d outside tolerance (float types)\n", cases,
              bits_bad, tol_bad);
  CHECK_EQ(bits_bad, 0);
  CHECK_EQ(tol_bad, 0);
}

namespace {

// Random weights of type t (rows x cols), with their bytes kept alive in `keep`.
Matrix random_matrix(gguf::TensorType t, int rows, int cols, Rng& rng, std::vector<std::vector<uint8_t>>& keep) {
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> wf(static_cast<size_t>(rows) * cols);
  for (auto& v : wf) v = nd(rng);
  const size_t rb = quant::bytes_for(t, cols);
  keep.emplace_back(rb * rows);
  for (int r = 0; r < rows; ++r) quant::quantize(t, &wf[static_cast<size_t>(r) * cols], cols, &keep.back()[r * rb]);
  Matrix m;
  m.type = t, m.rows = rows, m.cols = cols, m.data = keep.back().data(), m.row_bytes = rb;
  return m;
}

bool int8_weights(gguf::TensorType t) {
  return t == gguf::TensorType::Q8_0 || t == gguf::TensorType::Q4_0 || t == gguf::TensorType::Q4_1;
}

// Counts outputs that differ: in bits where `bits` (both sides the CPU's int8 arithmetic), else by
// more than 1e-5 * mag + 1e-6 (mag: the sum of |terms| behind each output).
int count_diffs(const std::vector<float>& want, const std::vector<float>& got, bool bits, const std::vector<double>& mag) {
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    bad += bits ? std::memcmp(&want[i], &got[i], sizeof(float)) != 0
                : !(std::fabs(double(want[i]) - got[i]) <= 1e-5 * mag[i] + 1e-6);
  return bad;
}

// W x as the pass must give it: the CPU's own product for the int8 types (bits), else the exact sum
// of the dequantised weights (the pass multiplies those with float activations); mag gets sum |w x|.
void reference_product(const Matrix& m, const std::vector<float>& x, int n, std::vector<float>& y, std::vector<double>& mag) {
  y.assign(size_t(n) * m.rows, 0.0f);
  mag.assign(y.size(), 0.0);
  std::vector<float> row(m.cols);
  for (int64_t r = 0; r < m.rows; ++r) {
    dequantize_row(m, r, row.data());
    for (int t = 0; t < n; ++t) {
      double acc = 0, a = 0;
      for (int64_t j = 0; j < m.cols; ++j) acc += double(row[j]) * x[t * m.cols + j], a += std::fabs(double(row[j]) * x[t * m.cols + j]);
      y[t * m.rows + r] = float(acc);
      mag[t * m.rows + r] = a;
    }
  }
  if (int8_weights(m.type)) matmul(m, x.data(), n, y.data());
}

}  // namespace

// The pass's fused launches: Q, K and V in one launch with their biases (or one each when their
// types differ), an output projection added into the residual, gate and up with SwiGLU.
OSD_TEST(model_fused_products_match_cpu) {
  gpu();
  using gguf::TensorType;
  Rng rng(43);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int cols = 256;
  int bad = 0, checked = 0;
  const std::vector<std::vector<TensorType>> sets = {
      {TensorType::Q4_1, TensorType::Q4_1, TensorType::Q4_1}, {TensorType::Q8_0, TensorType::Q8_0, TensorType::Q8_0},
      {TensorType::F16, TensorType::F16, TensorType::F16},    {TensorType::F32, TensorType::F32, TensorType::F32},
      {TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0}, {TensorType::F16, TensorType::Q8_0, TensorType::Q5_0}};
  for (const auto& types : sets) {
    // Bits wherever a product is int8 on both sides; float products within rounding.
    for (int n : {1, 5}) {
      std::vector<std::vector<uint8_t>> keep;
      const int rows[3] = {64, 32, 32};
      Matrix ms[3];
      for (int m = 0; m < 3; ++m) ms[m] = random_matrix(types[m], rows[m], cols, rng, keep);
      const Matrix* wp[3] = {&ms[0], &ms[1], &ms[2]};
      std::vector<float> x(size_t(n) * cols), bias[3], want[3], got[3];
      for (auto& v : x) v = nd(rng);
      std::vector<double> mag[3];
      for (int m = 0; m < 3; ++m) {
        bias[m].resize(rows[m]);
        for (auto& v : bias[m]) v = nd(rng);
        reference_product(ms[m], x, n, want[m], mag[m]);
        got[m].resize(want[m].size());
      }
      // Plain, with biases: y = Wx, then y += b (the CPU's order).
      {
        const float* bp[3] = {bias[0].data(), bias[1].data(), bias[2].data()};
        float* yp[3] = {got[0].data(), got[1].data(), got[2].data()};
        cuda::model_products(wp, 3, bp, x.data(), n, yp, cuda::ProductMode::Plain);
        for (int m = 0; m < 3; ++m) {
          std::vector<float> w = want[m];
          for (int t = 0; t < n; ++t)
            for (int r = 0; r < rows[m]; ++r) w[size_t(t) * rows[m] + r] += bias[m][r];
          bad += count_diffs(w, got[m], int8_weights(types[m]), mag[m]);
          checked += int(w.size());
        }
      }
      // Accumulate: y0 + W0 x.
      {
        std::vector<float> y0(want[0].size());
        for (auto& v : y0) v = nd(rng);
        std::vector<float> w(y0.size());
        for (size_t i = 0; i < w.size(); ++i) w[i] = y0[i] + want[0][i];
        float* yp[1] = {y0.data()};
        cuda::model_products(wp, 1, nullptr, x.data(), n, yp, cuda::ProductMode::Accumulate);
        bad += count_diffs(w, y0, int8_weights(types[0]), mag[0]);
        checked += int(w.size());
      }
      // SwiGLU over the two 32-row matrices: silu(g) * u, never in bits (exp may differ from the
      // CPU's in its last bit); the bound follows the factors' bounds.
      {
        const Matrix* gu[2] = {&ms[1], &ms[2]};
        std::vector<float> h(want[1].size()), w(h.size());
        std::vector<double> hm(h.size());
        for (size_t i = 0; i < w.size(); ++i) {
          const float g = want[1][i];
          w[i] = g / (1.0f + std::exp(-g)) * want[2][i];
          hm[i] = (mag[1][i] + 1) * (mag[2][i] + 1);
        }
        float* yp[1] = {h.data()};
        cuda::model_products(gu, 2, nullptr, x.data(), n, yp, cuda::ProductMode::Swiglu);
        bad += count_diffs(w, h, false, hm);
        checked += int(w.size());
      }
    }
  }
  std::printf("  %d outputs, %d differ\n", checked, bad);
  CHECK_EQ(bad, 0);
}

// The pass's rmsnorm, and the 8-bit activations it writes for the products it feeds: the CPU's
// rmsnorm (within a rounding of the double sum), and, where the rows agree in bits, the CPU's
// quantisation of them in bits.
OSD_TEST(model_rmsnorm_matches_cpu) {
  gpu();
  Rng rng(44);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  int bad = 0, same_rows = 0, rows_total = 0;
  for (int dim : {64, 576, 2048}) {
    const int rows = 7;
    std::vector<float> x(size_t(rows) * dim), w(dim), y(x.size()), xh(x.size()), want(x.size());
    for (auto& v : x) v = nd(rng) * 3.0f;
    for (auto& v : w) v = 1.0f + 0.1f * nd(rng);
    x[5] = NAN;  // row 0: a NaN block
    cuda::model_rmsnorm(x.data(), w.data(), rows, dim, 1e-5f, y.data(), xh.data());
    for (int r = 0; r < rows; ++r) {
      rmsnorm(&x[size_t(r) * dim], w.data(), dim, 1e-5f, &want[size_t(r) * dim]);
      const float* a = &want[size_t(r) * dim];
      const float* b = &y[size_t(r) * dim];
      for (int j = 0; j < dim; ++j)
        bad += !(std::isnan(a[j]) ? std::isnan(b[j]) : std::fabs(a[j] - b[j]) <= 1e-6f * std::fabs(a[j]) + 1e-7f);
      ++rows_total;
      if (std::memcmp(a, b, dim * sizeof(float)) != 0) continue;
      ++same_rows;
      const auto ref = quant::activation_roundtrip(gguf::TensorType::Q8_0, a, dim);
      for (int j = 0; j < dim; ++j) {
        const float g = xh[size_t(r) * dim + j];
        bad += std::isnan(ref[j]) ? !std::isnan(g) : std::memcmp(&ref[j], &g, sizeof(float)) != 0;
      }
    }
  }
  std::printf("  %d rows, %d equal in bits (their activations compared in bits), %d values differ\n", rows_total,
              same_rows, bad);
  CHECK(same_rows >= rows_total / 2);
  CHECK_EQ(bad, 0);
}

namespace {

// Compares logits rows of the CPU engine (a) and the device pass (b); see the tolerances above.
struct LogitCheck {
  double tol = 0, worst = 0;
  int rows = 0, bad = 0;
  void rows_of(const std::vector<float>& a, const std::vector<float>& b, int n, int V, const char* what) {
    for (int r = 0; r < n; ++r) {
      const float* x = &a[size_t(r) * V];
      const float* y = &b[size_t(r) * V];
      double scale = 1, d = 0;
      for (int j = 0; j < V; ++j) {
        if (x[j] == -INFINITY && y[j] == -INFINITY) continue;  // outside a restricted head
        scale = std::max(scale, double(std::fabs(x[j])));
        const double e = std::fabs(double(x[j]) - y[j]);
        d = std::isnan(e) ? INFINITY : std::max(d, e);
      }
      const double rel = d / scale;
      worst = std::max(worst, rel);
      ++rows;
      if (rel > tol) {
        ++bad;
        std::fprintf(stderr, "  %s row %d: max |d| %.3g of scale %.3g (tol %.3g)\n", what, r, d, scale, tol);
      }
    }
  }
};

// Gives a model the CUDA pass (graphs: 1 on, 0 off, -1 the default), or skips the test saying why.
void put_on_gpu(Model& m, int graphs = -1) {
  std::string why;
  cuda::set_model_pass_graphs(graphs);
  auto pass = cuda_model_pass(m, &why);
  cuda::set_model_pass_graphs(-1);
  if (!pass) throw Skip{why};
  m.set_device_pass(pass);
}

// The same requests on a model's CPU engine (cpu) and its device pass (dev, another instance of the
// same weights): prefill, chain, tree and keep_path, truncate, fork, a two-part batch, a long prefill.
void compare_passes(const std::shared_ptr<Model>& cpu, const std::shared_ptr<Model>& dev, KvType kv, double tol,
                    uint64_t seed, const char* what) {
  put_on_gpu(*dev);
  const int V = cpu->config().vocab;
  Rng rng(seed);
  auto ids = [&](int n) {
    std::vector<int32_t> t(n);
    for (auto& v : t) v = randint(rng, 0, V - 1);
    return t;
  };
  LogitCheck lc;
  lc.tol = tol;
  Sequence a(cpu, 0, kv), b(dev, 0, kv);
  auto both = [&](Sequence& sa, Sequence& sb, const std::vector<int32_t>& t, const int32_t* parents, bool last_only,
                  const char* step) {
    const int n = static_cast<int>(t.size()), rows = last_only ? 1 : n;
    std::vector<float> la(size_t(rows) * V), lb(la.size());
    sa.evaluate(t.data(), n, parents, la.data(), last_only);
    sb.evaluate(t.data(), n, parents, lb.data(), last_only);
    CHECK_EQ(sa.length(), sb.length());
    lc.rows_of(la, lb, rows, V, (std::string(what) + " " + step).c_str());
  };
  both(a, b, ids(60), nullptr, true, "prefill");
  both(a, b, ids(10), nullptr, false, "chain past the first 64 slots");  // the cache grows, copying
  const int32_t parents[7] = {-1, 0, 0, 1, 1, 2, 5};
  const int base = a.length();
  both(a, b, ids(7), parents, false, "tree");
  const int32_t path[3] = {0, 2, 5};
  a.keep_path(base, path, 3);
  b.keep_path(base, path, 3);
  both(a, b, ids(1), nullptr, false, "after keep_path");
  a.truncate(a.length() - 2);
  b.truncate(b.length() - 2);
  both(a, b, ids(3), nullptr, false, "after truncate");
  auto fa = a.fork();
  auto fb = b.fork();
  both(*fa, *fb, ids(3), nullptr, false, "fork");
  both(a, b, ids(2), nullptr, false, "original after fork");  // the batch below: parts of unequal lengths
  {
    const auto t0 = ids(3), t1 = ids(3);
    const int32_t p1[3] = {-1, 0, 0};
    std::vector<float> la0(3 * V), la1(3 * V), lb0(3 * V), lb1(3 * V);
    const EvalPart pa[2] = {{&a, t0.data(), 3, nullptr, la0.data(), false}, {fa.get(), t1.data(), 3, p1, la1.data(), false}};
    const EvalPart pb[2] = {{&b, t0.data(), 3, nullptr, lb0.data(), false}, {fb.get(), t1.data(), 3, p1, lb1.data(), false}};
    Sequence::evaluate_parts(pa, 2);
    Sequence::evaluate_parts(pb, 2);
    lc.rows_of(la0, lb0, 3, V, (std::string(what) + " batch part 0").c_str());
    lc.rows_of(la1, lb1, 3, V, (std::string(what) + " batch part 1").c_str());
  }
  {
    Sequence la_(cpu, 0, kv), lb_(dev, 0, kv);
    both(la_, lb_, ids(std::min(300, cpu->config().context - 1)), nullptr, true, "long prefill");
    both(la_, lb_, ids(1), nullptr, false, "decode after long prefill");
    // A fork of a 512-slot cache at 70 tokens has 128 slots: copies between different pitches.
    la_.truncate(70);
    lb_.truncate(70);
    auto ga = la_.fork();
    auto gb = lb_.fork();
    both(*ga, *gb, ids(4), nullptr, false, "fork of a longer cache");
  }
  std::printf("  %s (kv %s): %d rows, worst max |d| / scale %.3g (tol %.3g)\n", what, kv_type_name(kv), lc.rows,
              lc.worst, tol);
  CHECK_EQ(lc.bad, 0);
}

std::string random_model_path(const char* name, gguf::TensorType type, int dim = 128, int heads = 4, int kv_heads = 2) {
  ModelConfig c;
  c.vocab = 512, c.dim = dim, c.n_layers = 2, c.n_heads = heads, c.n_kv_heads = kv_heads, c.ffn_dim = 352, c.context = 1024;
  const std::string path = std::string("/tmp/osd-test-cuda-") + name + ".gguf";
  write_random_gguf(path, c, 7, type);
  return path;
}

}  // namespace

OSD_TEST(model_pass_matches_cpu_random_models) {
  gpu();
  using gguf::TensorType;
  const std::string f32 = random_model_path("pass", TensorType::F32);
  for (KvType kv : {KvType::F16, KvType::F32}) {
    compare_passes(Model::load(f32), Model::load(f32), kv, 2e-3, 1, "random F32");
  }
  // Attention in chunks of rows (a limit far below the default).
  cuda::set_model_pass_score_limit(4096);
  compare_passes(Model::load(f32), Model::load(f32), KvType::F16, 2e-3, 6, "random F32, attention in chunks");
  cuda::set_model_pass_score_limit(0);
  // head_dim 96: the attention's thread groups do not divide its 256 threads evenly.
  const std::string hd96 = random_model_path("hd96", TensorType::F32, 192, 2, 1);
  compare_passes(Model::load(hd96), Model::load(hd96), KvType::F16, 2e-3, 7, "random F32, head_dim 96");
  const auto src = Model::load(f32);
  for (TensorType t : {TensorType::F16, TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0}) {
    const double tol = t == TensorType::F16 ? 2e-3 : 3e-2;
    compare_passes(convert_model(*src, t), convert_model(*src, t), KvType::F16, tol, 2,
                   (std::string("random ") + gguf::type_info(t).name).c_str());
  }
  // A restricted head (osd.head_tokens): its rows' logits, -infinity elsewhere, on both.
  std::vector<int32_t> head;
  for (int32_t id = 0; id < src->config().vocab; id += 3) head.push_back(id);
  for (TensorType t : {TensorType::F32, TensorType::Q8_0})
    compare_passes(convert_model(*src, t, &head), convert_model(*src, t, &head), KvType::F16, t == TensorType::F32 ? 2e-3 : 3e-2,
                   8, (std::string("random ") + gguf::type_info(t).name + ", restricted head").c_str());
}

// Greedy speculative decoding on the device is token-identical to target-only decoding there only
// if a token's logits do not depend on the batch it shares: a chain's rows and a tree's nodes must
// give the bits of decoding the same path one token at a time.
OSD_TEST(model_pass_is_batch_invariant) {
  gpu();
  using gguf::TensorType;
  const std::string f32 = random_model_path("invariance", TensorType::F32);
  const auto src = Model::load(f32);
  int bad = 0, checked = 0;
  for (TensorType t : {TensorType::F32, TensorType::F16, TensorType::Q4_1}) {
    for (KvType kv : {KvType::F16, KvType::F32}) {
      auto m = t == TensorType::F32 ? Model::load(f32) : convert_model(*src, t);
      put_on_gpu(*m);
      const int V = m->config().vocab;
      const std::vector<int32_t> prompt = {3, 141, 59, 26, 5, 358, 97, 93, 238, 46, 264, 338, 327, 95, 28, 84, 197, 169, 399, 375};
      const std::vector<int32_t> chain = {7, 300, 12, 451, 60};
      Sequence a(m, 0, kv), b(m, 0, kv);
      std::vector<float> scratch(static_cast<size_t>(V)), rows(chain.size() * V), one(static_cast<size_t>(V));
      a.evaluate(prompt.data(), int32_t(prompt.size()), nullptr, scratch.data(), true);
      b.evaluate(prompt.data(), int32_t(prompt.size()), nullptr, scratch.data(), true);
      a.evaluate(chain.data(), int32_t(chain.size()), nullptr, rows.data());
      for (size_t i = 0; i < chain.size(); ++i) {
        b.evaluate(&chain[i], 1, nullptr, one.data());
        bad += std::memcmp(one.data(), &rows[i * V], V * sizeof(float)) != 0;
        ++checked;
      }
      // A tree over the prompt: node 4's path is 0 -> 1 -> 4, decoded one by one in c.
      const std::vector<int32_t> nodes = {7, 300, 301, 302, 12};
      const int32_t parents[5] = {-1, 0, 0, 0, 1};
      Sequence tr(m, 0, kv), c(m, 0, kv);
      tr.evaluate(prompt.data(), int32_t(prompt.size()), nullptr, scratch.data(), true);
      c.evaluate(prompt.data(), int32_t(prompt.size()), nullptr, scratch.data(), true);
      std::vector<float> tree(nodes.size() * V);
      tr.evaluate(nodes.data(), int32_t(nodes.size()), parents, tree.data());
      for (int node : {0, 1, 4}) {
        c.evaluate(&nodes[node], 1, nullptr, one.data());
        bad += std::memcmp(one.data(), &tree[size_t(node) * V], V * sizeof(float)) != 0;
        ++checked;
      }
    }
  }
  std::printf("  %d rows checked, %d differ in bits from one-token decoding\n", checked, bad);
  CHECK_EQ(bad, 0);
}

// Small passes replay CUDA graphs (on by default): a decode loop with verification chains, trees and
// rollbacks must give the bits of the same passes launched one kernel at a time, across the step
// where the scores' stride grows (a new graph) and with a kept graph reused after other shapes.
OSD_TEST(model_pass_graphs_give_the_same_bits) {
  gpu();
  using gguf::TensorType;
  const std::string f32 = random_model_path("graphs", TensorType::F32);
  const auto src = Model::load(f32);
  int bad = 0, steps = 0;
  for (TensorType t : {TensorType::F16, TensorType::Q4_1}) {
    std::shared_ptr<Model> ms[2];
    for (int k = 0; k < 2; ++k) {
      ms[k] = convert_model(*src, t);
      put_on_gpu(*ms[k], k);  // model 0 without graphs, model 1 with them
    }
    const int V = src->config().vocab;
    Sequence a(ms[0]), b(ms[1]);
    Rng rng(9);
    std::vector<float> la(8 * size_t(V)), lb(la.size());
    auto step = [&](const std::vector<int32_t>& toks, const int32_t* parents) {
      const int n = static_cast<int>(toks.size());
      a.evaluate(toks.data(), n, parents, la.data());
      b.evaluate(toks.data(), n, parents, lb.data());
      bad += std::memcmp(la.data(), lb.data(), size_t(n) * V * sizeof(float)) != 0;
      ++steps;
    };
    step({1, 2, 3}, nullptr);
    const int32_t parents[6] = {-1, 0, 0, 1, 1, 3};
    while (a.length() < 300) {  // the stride grows from 256 to 512 slots on the way
      const int base = a.length();
      step({randint(rng, 0, V - 1)}, nullptr);
      std::vector<int32_t> chain(5);
      for (auto& v : chain) v = randint(rng, 0, V - 1);
      step(chain, nullptr);
      a.truncate(base + 3), b.truncate(base + 3);
      if (a.length() % 7 == 0) {
        const int tb = a.length();
        std::vector<int32_t> nodes(6);
        for (auto& v : nodes) v = randint(rng, 0, V - 1);
        step(nodes, parents);
        const int32_t path[3] = {0, 1, 4};
        a.keep_path(tb, path, 3), b.keep_path(tb, path, 3);
      }
    }
    // Two sequences in one pass, one of them a prefill's last row only (fewer output rows than tokens).
    auto a2 = a.fork();
    auto b2 = b.fork();
    for (int rep = 0; rep < 4; ++rep) {
      const int32_t t0 = randint(rng, 0, V - 1), t1[2] = {randint(rng, 0, V - 1), randint(rng, 0, V - 1)};
      std::vector<float> x0(V), x1(V), y0(V), y1(V);
      const EvalPart pa[2] = {{&a, &t0, 1, nullptr, x0.data(), false}, {a2.get(), t1, 2, nullptr, x1.data(), true}};
      const EvalPart pb[2] = {{&b, &t0, 1, nullptr, y0.data(), false}, {b2.get(), t1, 2, nullptr, y1.data(), true}};
      Sequence::evaluate_parts(pa, 2);
      Sequence::evaluate_parts(pb, 2);
      bad += x0 != y0 || x1 != y1;
      ++steps;
    }
    const auto off = cuda::model_pass_graph_stats(*ms[0]->device_pass());
    const auto on = cuda::model_pass_graph_stats(*ms[1]->device_pass());
    std::printf("  %s: graphs captured %lld, replayed %lld (off: %lld, %lld)\n", gguf::type_info(t).name,
                (long long)on.captures, (long long)on.replays, (long long)off.captures, (long long)off.replays);
    CHECK(on.enabled && !off.enabled);
    CHECK(on.captures >= 3 && on.replays >= 100);  // decode, chain and batch shapes; most passes replay
    CHECK_EQ(off.captures + off.replays, 0);
  }
  std::printf("  %d passes, %d differ in bits from launching kernel by kernel\n", steps, bad);
  CHECK_EQ(bad, 0);
}

// qwen2's Q, K and V biases and qwen3's per-head query and key norms, set on a llama model's layers.
OSD_TEST(model_pass_matches_cpu_biases_and_head_norms) {
  gpu();
  const std::string f32 = random_model_path("qwen", gguf::TensorType::F32);
  auto cpu = Model::load(f32), dev = Model::load(f32);
  const ModelConfig& c = cpu->config();
  Rng rng(5);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  std::vector<std::vector<float>> keep;
  auto vec = [&](size_t n, float mean) {
    keep.emplace_back(n);
    for (auto& v : keep.back()) v = mean + nd(rng);
    return keep.back().data();
  };
  for (size_t l = 0; l < cpu->layers.size(); ++l) {
    const float *bq = vec(c.q_dim(), 0), *bk = vec(c.kv_dim(), 0), *bv = vec(c.kv_dim(), 0);
    const float *qn = vec(c.head_dim, 1), *kn = vec(c.head_dim, 1);
    for (Model* m : {cpu.get(), dev.get()}) {
      LayerWeights& w = m->layers[l];
      w.bq = bq, w.bk = bk, w.bv = bv, w.q_norm = qn, w.k_norm = kn;
    }
  }
  compare_passes(cpu, dev, KvType::F16, 2e-3, 3, "biases and head norms");
}

OSD_TEST(model_pass_matches_cpu_default_target) {
  gpu();
  const char* path = "models/default-target.gguf";
  if (FILE* f = std::fopen(path, "rb")) std::fclose(f);
  else throw Skip{std::string(path) + " not found (run from the repository root)"};
  compare_passes(Model::load(path), Model::load(path), KvType::F16, 2e-3, 4, "default target");
}

OSD_TEST(model_pass_matches_cpu_smollm2) {
  gpu();
  const char* path = "../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (FILE* f = std::fopen(path, "rb")) std::fclose(f);
  else throw Skip{std::string(path) + " not found"};
  compare_passes(Model::load(path), Model::load(path), KvType::F16, 6e-2, 5, "SmolLM2-135M Q4_1");
}

// ---------------------------------------------------------------------------------------------

// Usage: test_cuda [NAME_PART | =EXACT_NAME | --list]
int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  if (filter && !std::strcmp(filter, "--list")) {
    for (auto& c : osd_test::registry()) std::printf("%s\n", c.name);
    return 0;
  }
  std::string why;
  CudaBackend* g = gpu_or_null(&why);
  if (g)
    std::printf("device: %s; compiled for %s\n", g->device_name().c_str(), cuda_backend_targets().c_str());
  else
    std::printf("no usable CUDA device (%s); compiled for %s\n", why.c_str(), cuda_backend_targets().c_str());
  int passed = 0, failed = 0, skipped = 0;
  for (auto& c : osd_test::registry()) {
    if (filter && (filter[0] == '=' ? std::strcmp(c.name, filter + 1) != 0 : !std::strstr(c.name, filter))) continue;
    const int before = osd_test::failures();
    const auto t0 = std::chrono::steady_clock::now();
    try {
      c.fn();
    } catch (const Skip& s) {
      std::printf("skip %s: %s\n", c.name, s.why.c_str());
      ++skipped;
      continue;
    } catch (const std::exception& e) {
      osd_test::fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const bool ok = osd_test::failures() == before;
    std::printf("%s %s (%.2f s)\n", ok ? "ok  " : "FAIL", c.name, secs);
    std::fflush(stdout);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed == 0 ? 0 : 1;
}
