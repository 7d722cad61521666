#include "train/train_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/thread_pool.h"
#include "model/tensor_ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OSD_TRAIN_X86 1
#define OSD_TRAIN_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace osd::train {

namespace {
// Pools are kept once made (one per size asked for, their idle threads asleep), so that a step
// still running on a pool when another size is chosen never sees it freed.
std::mutex g_train_mu;
std::vector<std::unique_ptr<ThreadPool>> g_train_pools;
std::atomic<ThreadPool*> g_train_pool{nullptr};
}  // namespace

ThreadPool& train_pool() {
  ThreadPool* p = g_train_pool.load(std::memory_order_acquire);
  return p ? *p : default_pool();
}

void set_train_threads(int threads) {
  if (threads < 0 || threads > 1024) throw_range("trainThreads must be in [0, 1024], got " + std::to_string(threads));
  std::lock_guard<std::mutex> lk(g_train_mu);
  if (threads == 0) {
    g_train_pool.store(nullptr, std::memory_order_release);
    return;
  }
  for (auto& p : g_train_pools) {
    if (p->size() == threads) {
      g_train_pool.store(p.get(), std::memory_order_release);
      return;
    }
  }
  g_train_pools.push_back(std::make_unique<ThreadPool>(threads));
  g_train_pool.store(g_train_pools.back().get(), std::memory_order_release);
}

int train_threads() {
  ThreadPool* p = g_train_pool.load(std::memory_order_acquire);
  return p ? p->size() : 0;
}

namespace {

// The same decision as tensor_ops.cpp makes for its dot products, so that linear_forward takes
// the AVX2 path exactly when osd::matmul does (bitwise parity with inference depends on it).
bool use_avx2() {
#if defined(OSD_TRAIN_X86)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !std::getenv("OSD_NO_AVX2");
  return yes;
#else
  return false;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// The two AVX2 micro-kernels. Accumulators are named variables: GCC keeps arrays of __m256 in
// memory and stores them on every iteration, which halves the speed. A tile at the edge of a
// matrix repeats a valid row pointer for its missing rows and drops their results.
#if defined(OSD_TRAIN_X86)
// The pairwise lane sum of dot_f32_avx2 (tensor_ops.cpp), ((a0 + a4) + (a1 + a5)) + ((a2 + a6) +
// (a3 + a7)), of four accumulators at once: the same additions of the same operands in the same
// order, one lane per accumulator.
OSD_TRAIN_AVX2 inline __m128 sum_lanes4(__m256 p, __m256 q, __m256 r, __m256 s) {
  __m128 P = _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1));  // (a0+a4, a1+a5, a2+a6, a3+a7)
  __m128 Q = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
  __m128 R = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
  __m128 S = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  _MM_TRANSPOSE4_PS(P, Q, R, S);  // P = every accumulator's a0+a4, Q its a1+a5, ...
  return _mm_add_ps(_mm_add_ps(P, Q), _mm_add_ps(R, S));
}

// Y = X W^T on 4 tokens x 3 weight rows: out[t][r] = dot(w[r], x[t]) over `in` (a multiple of 8).
// Each accumulator is one 8-lane FMA chain over the row, summed pairwise: exactly dot_f32_avx2,
// with 12 independent chains in flight instead of one.
OSD_TRAIN_AVX2 void nt_kernel_4x3(const float* const* x, const float* const* w, int64_t in, float out[4][3]) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *w0 = w[0], *w1 = w[1], *w2 = w[2];
  for (int64_t i = 0; i < in; i += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i), v2 = _mm256_loadu_ps(w2 + i);
    __m256 t = _mm256_loadu_ps(x0 + i);
    a00 = _mm256_fmadd_ps(v0, t, a00), a01 = _mm256_fmadd_ps(v1, t, a01), a02 = _mm256_fmadd_ps(v2, t, a02);
    t = _mm256_loadu_ps(x1 + i);
    a10 = _mm256_fmadd_ps(v0, t, a10), a11 = _mm256_fmadd_ps(v1, t, a11), a12 = _mm256_fmadd_ps(v2, t, a12);
    t = _mm256_loadu_ps(x2 + i);
    a20 = _mm256_fmadd_ps(v0, t, a20), a21 = _mm256_fmadd_ps(v1, t, a21), a22 = _mm256_fmadd_ps(v2, t, a22);
    t = _mm256_loadu_ps(x3 + i);
    a30 = _mm256_fmadd_ps(v0, t, a30), a31 = _mm256_fmadd_ps(v1, t, a31), a32 = _mm256_fmadd_ps(v2, t, a32);
  }
  alignas(16) float r[4];
  _mm_store_ps(r, sum_lanes4(a00, a10, a20, a30));
  out[0][0] = r[0], out[1][0] = r[1], out[2][0] = r[2], out[3][0] = r[3];
  _mm_store_ps(r, sum_lanes4(a01, a11, a21, a31));
  out[0][1] = r[0], out[1][1] = r[1], out[2][1] = r[2], out[3][1] = r[3];
  _mm_store_ps(r, sum_lanes4(a02, a12, a22, a32));
  out[0][2] = r[0], out[1][2] = r[1], out[2][2] = r[2], out[3][2] = r[3];
}

// out[r][0..16) = sum_k a[k * 6 + r] b[k * 16 + 0..16) over kc steps, A and B packed.
OSD_TRAIN_AVX2 void nn_kernel_6x16(int64_t kc, const float* a, const float* b, float out[6][16]) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += 6, b += 16) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 t = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(t, b0, c00), c01 = _mm256_fmadd_ps(t, b1, c01);
    t = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(t, b0, c10), c11 = _mm256_fmadd_ps(t, b1, c11);
    t = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(t, b0, c20), c21 = _mm256_fmadd_ps(t, b1, c21);
    t = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(t, b0, c30), c31 = _mm256_fmadd_ps(t, b1, c31);
    t = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(t, b0, c40), c41 = _mm256_fmadd_ps(t, b1, c41);
    t = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(t, b0, c50), c51 = _mm256_fmadd_ps(t, b1, c51);
  }
  _mm256_storeu_ps(out[0], c00), _mm256_storeu_ps(out[0] + 8, c01);
  _mm256_storeu_ps(out[1], c10), _mm256_storeu_ps(out[1] + 8, c11);
  _mm256_storeu_ps(out[2], c20), _mm256_storeu_ps(out[2] + 8, c21);
  _mm256_storeu_ps(out[3], c30), _mm256_storeu_ps(out[3] + 8, c31);
  _mm256_storeu_ps(out[4], c40), _mm256_storeu_ps(out[4] + 8, c41);
  _mm256_storeu_ps(out[5], c50), _mm256_storeu_ps(out[5] + 8, c51);
}
#endif

constexpr int kNtTokens = 4, kNtRows = 3, kNnRows = 6;

// The portable NN kernel: the same contract, left to the compiler.
void nn_kernel_ref(int64_t kc, const float* a, const float* b, float out[6][16]) {
  for (int r = 0; r < kNnRows; ++r) std::fill(out[r], out[r] + 16, 0.0f);
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < kNnRows; ++r)
      for (int j = 0; j < 16; ++j) out[r][j] += a[k * 6 + r] * b[k * 16 + j];
}

}  // namespace

// ---- Matrix products ----------------------------------------------------------------------------

void linear_forward(const float* w, int64_t out, int64_t in, const float* x, int64_t n, float* y) {
#if defined(OSD_TRAIN_X86)
  if (use_avx2() && in % 8 == 0) {
    constexpr int64_t kRowBlock = 16 * kNtRows, kTokBlock = 16 * kNtTokens;
    const int64_t nrb = ceil_div(out, kRowBlock), ntb = ceil_div(n, kTokBlock);
    train_pool().parallel_for(static_cast<size_t>(nrb * ntb), 1, [&](size_t lo, size_t hi) {
      for (size_t task = lo; task < hi; ++task) {
        const int64_t rb = static_cast<int64_t>(task) / ntb, tb = static_cast<int64_t>(task) % ntb;
        const int64_t r0 = rb * kRowBlock, r1 = std::min(out, r0 + kRowBlock);
        const int64_t t0 = tb * kTokBlock, t1 = std::min(n, t0 + kTokBlock);
        // A 3-row tile of W stays in L1 while the token block (in L2) streams past it.
        for (int64_t r = r0; r < r1; r += kNtRows) {
          const int64_t rr = std::min<int64_t>(kNtRows, r1 - r);
          const float* ws[kNtRows];
          for (int i = 0; i < kNtRows; ++i) ws[i] = w + (r + std::min<int64_t>(i, rr - 1)) * in;
          for (int64_t t = t0; t < t1; t += kNtTokens) {
            const int64_t tt = std::min<int64_t>(kNtTokens, t1 - t);
            const float* xs[kNtTokens];
            for (int i = 0; i < kNtTokens; ++i) xs[i] = x + (t + std::min<int64_t>(i, tt - 1)) * in;
            float res[kNtTokens][kNtRows];
            nt_kernel_4x3(xs, ws, in, res);
            for (int64_t i = 0; i < tt; ++i)
              for (int64_t j = 0; j < rr; ++j) y[(t + i) * out + r + j] = res[i][j];
          }
        }
      }
    });
    return;
  }
#endif
  matmul(matrix_f32(w, out, in), x, n, y);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  // Tasks are blocks of kRowBlock x kColBlock of C. Per kDepth slice of k, a task packs its slice
  // of B into [k][16] panels and its slice of A into [k][6] strips (zero-padded at the edges), so
  // the kernel reads contiguous memory whatever the strides: one B panel stays in L1 while the A
  // strips (in L2) stream past it, as in BLIS.
  constexpr int64_t kRowBlock = 32 * kNnRows, kColBlock = 256, kDepth = 256;
  const bool avx2 = use_avx2();
  const int64_t nmb = ceil_div(M, kRowBlock), nnb = ceil_div(N, kColBlock);
  train_pool().parallel_for(static_cast<size_t>(nmb * nnb), 1, [&](size_t lo, size_t hi) {
    std::vector<float> bp(static_cast<size_t>(kDepth * kColBlock)), ap(static_cast<size_t>(kDepth * kRowBlock));
    for (size_t task = lo; task < hi; ++task) {
      const int64_t i0 = static_cast<int64_t>(task) / nnb * kRowBlock, i1 = std::min(M, i0 + kRowBlock);
      const int64_t j0 = static_cast<int64_t>(task) % nnb * kColBlock, j1 = std::min(N, j0 + kColBlock);
      const int64_t panels = ceil_div(j1 - j0, 16), strips = ceil_div(i1 - i0, kNnRows);
      if (!accumulate)
        for (int64_t i = i0; i < i1; ++i) std::fill(c + i * ldc + j0, c + i * ldc + j1, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t kc = std::min(kDepth, K - k0);
        for (int64_t pn = 0; pn < panels; ++pn) {
          float* dst = &bp[pn * kc * 16];
          const int64_t j = j0 + pn * 16, w = std::min<int64_t>(16, j1 - j);
          if (w < 16) std::fill(dst, dst + kc * 16, 0.0f);
          for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * 16, b + (k0 + k) * ldb + j, w * sizeof(float));
        }
        for (int64_t st = 0; st < strips; ++st) {
          float* dst = &ap[st * kc * kNnRows];
          const int64_t i = i0 + st * kNnRows, rows = std::min<int64_t>(kNnRows, i1 - i);
          const float* src = a + i * a_rs + k0 * a_cs;
          if (rows < kNnRows) std::fill(dst, dst + kc * kNnRows, 0.0f);
          if (a_rs == 1) {  // A transposed: each k holds the strip's rows side by side
            for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * kNnRows, src + k * a_cs, rows * sizeof(float));
          } else {
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t k = 0; k < kc; ++k) dst[k * kNnRows + r] = src[r * a_rs + k * a_cs];
          }
        }
        for (int64_t pn = 0; pn < panels; ++pn) {
          const int64_t j = j0 + pn * 16, w = std::min<int64_t>(16, j1 - j);
          for (int64_t st = 0; st < strips; ++st) {
            const int64_t i = i0 + st * kNnRows, rows = std::min<int64_t>(kNnRows, i1 - i);
            float res[kNnRows][16];
#if defined(OSD_TRAIN_X86)
            if (avx2)
              nn_kernel_6x16(kc, &ap[st * kc * kNnRows], &bp[pn * kc * 16], res);
            else
#endif
              nn_kernel_ref(kc, &ap[st * kc * kNnRows], &bp[pn * kc * 16], res);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t q = 0; q < w; ++q) c[(i + r) * ldc + j + q] += res[r][q];
          }
        }
      }
    }
  });
}

void linear_backward(const float* w, int64_t out, int64_t in, const float* x, const float* dy, int64_t n, float* dx,
                     bool accumulate_dx, float* dw) {
  // dx[n x in] = dy[n x out] W[out x in]
  if (dx) gemm(n, in, out, dy, out, 1, w, in, dx, in, accumulate_dx);
  // dw[out x in] += dy^T[out x n] x[n x in]
  if (dw) gemm(out, in, n, dy, 1, out, x, in, dw, in, true);
}

// ---- RMSNorm -------------------------------------------------------------------------------------

namespace {
float rms_scale(const float* x, int64_t dim, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(ss / dim + eps));  // as osd::rmsnorm computes it
}
}  // namespace

void rmsnorm_forward(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* y, float* rstd) {
  train_pool().parallel_for(static_cast<size_t>(n), 16, [&](size_t lo, size_t hi) {
    for (size_t r = lo; r < hi; ++r) {
      rmsnorm(x + r * dim, w, dim, eps, y + r * dim);
      rstd[r] = rms_scale(x + r * dim, dim, eps);
    }
  });
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t n, int64_t dim,
                      float* dx, bool accumulate_dx, float* dw) {
  // y_i = w_i r x_i with r = (mean(x^2) + eps)^(-1/2), so dr/dx_i = -r^3 x_i / dim and
  // dx_i = r w_i dy_i - x_i r^3 / dim * sum_j w_j dy_j x_j.
  if (dx)
    train_pool().parallel_for(static_cast<size_t>(n), 16, [&](size_t lo, size_t hi) {
      for (size_t row = lo; row < hi; ++row) {
        const float* xr = x + row * dim;
        const float* g = dy + row * dim;
        float* d = dx + row * dim;
        const double r = rstd[row];
        double dot = 0.0;
        for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(w[i]) * g[i] * xr[i];
        const float c = static_cast<float>(r * r * r * dot / dim), rf = static_cast<float>(r);
        for (int64_t i = 0; i < dim; ++i) {
          const float v = rf * w[i] * g[i] - c * xr[i];
          d[i] = accumulate_dx ? d[i] + v : v;
        }
      }
    });
  if (dw)  // rows in order: deterministic
    for (int64_t row = 0; row < n; ++row) {
      const float r = rstd[row];
      for (int64_t i = 0; i < dim; ++i) dw[i] += dy[row * dim + i] * (r * x[row * dim + i]);
    }
}

// ---- RoPE ----------------------------------------------------------------------------------------

RopeTable rope_table(const ModelConfig& c, int64_t positions) {
  RopeTable t;
  t.head_dim = c.head_dim;
  t.positions = positions;
  t.neox = c.rope_neox;
  t.theta = c.rope_theta;
  t.freq_scale = c.rope_freq_scale;
  const int64_t half = c.head_dim / 2, head_dim = c.head_dim;
  t.cos.resize(static_cast<size_t>(positions * half));
  t.sin.resize(static_cast<size_t>(positions * half));
  for (int64_t pos = 0; pos < positions; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      // The expressions of osd::rope, term for term.
      double freq = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / head_dim) * c.rope_freq_scale;
      if (!c.rope_factors.empty()) freq /= c.rope_factors[i];  // as the Sequence's angles
      const double angle = pos * freq;
      t.cos[pos * half + i] = static_cast<float>(std::cos(angle));
      t.sin[pos * half + i] = static_cast<float>(std::sin(angle));
    }
  return t;
}

void rope_apply(const RopeTable& t, float* v, int64_t pos) {
  const int64_t half = t.head_dim / 2;
  const float* cs = &t.cos[pos * half];
  const float* sn = &t.sin[pos * half];
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = t.neox ? i : 2 * i, b = t.neox ? i + half : 2 * i + 1;
    const float c = cs[i], s = sn[i];
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
}

void rope_backward(const RopeTable& t, float* dv, int64_t pos) {
  const int64_t half = t.head_dim / 2;
  const float* cs = &t.cos[pos * half];
  const float* sn = &t.sin[pos * half];
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = t.neox ? i : 2 * i, b = t.neox ? i + half : 2 * i + 1;
    const float c = cs[i], s = sn[i];
    const float g0 = dv[a], g1 = dv[b];
    dv[a] = g0 * c + g1 * s;
    dv[b] = g1 * c - g0 * s;
  }
}

void rope_rows(const RopeTable& t, float* x, int64_t n, int64_t seq, int64_t heads, bool backward) {
  const int64_t width = heads * t.head_dim;
  train_pool().parallel_for(static_cast<size_t>(n), 16, [&](size_t lo, size_t hi) {
    for (size_t row = lo; row < hi; ++row) {
      const int64_t pos = static_cast<int64_t>(row) % seq;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + row * width + h * t.head_dim;
        backward ? rope_backward(t, v, pos) : rope_apply(t, v, pos);
      }
    }
  });
}

// ---- Attention -----------------------------------------------------------------------------------

void attention_forward(const AttnShape& s, const float* q, const float* k, const float* v, float* probs, float* out) {
  const int64_t T = s.seq, H = s.n_heads, HD = s.head_dim;
  const int64_t QD = H * HD, KVD = static_cast<int64_t>(s.n_kv_heads) * HD;
  const int64_t group = H / s.n_kv_heads;
  const float inv_sqrt_hd = 1.0f / std::sqrt(static_cast<float>(HD));
  // One task per (sequence, head); per query the operations of Sequence::evaluate, in its order.
  train_pool().parallel_for(static_cast<size_t>(s.batch * H), 1, [&](size_t lo, size_t hi) {
    for (size_t task = lo; task < hi; ++task) {
      const int64_t b = static_cast<int64_t>(task) / H, h = static_cast<int64_t>(task) % H, kh = h / group;
      const float* kb = k + (b * T) * KVD + kh * HD;
      const float* vb = v + (b * T) * KVD + kh * HD;
      for (int64_t i = 0; i < T; ++i) {
        float* p = probs + ((b * H + h) * T + i) * T;
        // The attention of Sequence::evaluate (osd::attend_head), so that logits are bitwise equal;
        // p receives the attention weights.
        attend_head(q + (b * T + i) * QD + h * HD, kb, vb, static_cast<size_t>(KVD), static_cast<int32_t>(i + 1), nullptr, 0,
                    HD, inv_sqrt_hd, p, out + (b * T + i) * QD + h * HD);
        std::fill(p + i + 1, p + T, 0.0f);  // the masked keys, so backward can use whole rows
      }
    }
  });
}

void attention_backward(const AttnShape& s, const float* q, const float* k, const float* v, const float* probs,
                        const float* dout, float* dq, float* dk, float* dv) {
  const int64_t T = s.seq, H = s.n_heads, KVH = s.n_kv_heads, HD = s.head_dim;
  const int64_t QD = H * HD, KVD = KVH * HD, group = H / KVH;
  const float inv_sqrt_hd = 1.0f / std::sqrt(static_cast<float>(HD));
  // One task per (sequence, kv head): it owns dk and dv of that head and dq of its query heads.
  // Per head, as T x T matrix products (the masked upper triangle of P is zero):
  //   dP = dO V^T,  dS = P * (dP - rowsum(P * dP)) / sqrt(hd),
  //   dQ = dS K,  dK += dS^T Q,  dV += P^T dO.
  // gemm called from a pool task runs on that task's thread.
  train_pool().parallel_for(static_cast<size_t>(s.batch * KVH), 1, [&](size_t lo, size_t hi) {
    std::vector<float> vt(static_cast<size_t>(HD * T)), ds(static_cast<size_t>(T * T));
    for (size_t task = lo; task < hi; ++task) {
      const int64_t b = static_cast<int64_t>(task) / KVH, kh = static_cast<int64_t>(task) % KVH;
      const float* kb = k + b * T * KVD + kh * HD;
      const float* vb = v + b * T * KVD + kh * HD;
      float* dkb = dk + b * T * KVD + kh * HD;
      float* dvb = dv + b * T * KVD + kh * HD;
      for (int64_t j = 0; j < T; ++j) {
        std::fill_n(dkb + j * KVD, HD, 0.0f);
        std::fill_n(dvb + j * KVD, HD, 0.0f);
        for (int64_t d = 0; d < HD; ++d) vt[d * T + j] = vb[j * KVD + d];
      }
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        const float* p = probs + (b * H + h) * T * T;
        const float* qb = q + b * T * QD + h * HD;
        const float* gob = dout + b * T * QD + h * HD;
        gemm(T, T, HD, gob, QD, 1, vt.data(), T, ds.data(), T, false);  // dP
        for (int64_t i = 0; i < T; ++i) {
          float* row = &ds[i * T];
          double pdp = 0.0;
          for (int64_t j = 0; j <= i; ++j) pdp += static_cast<double>(p[i * T + j]) * row[j];
          const float c = static_cast<float>(pdp);
          for (int64_t j = 0; j <= i; ++j) row[j] = p[i * T + j] * (row[j] - c) * inv_sqrt_hd;
          std::fill(row + i + 1, row + T, 0.0f);
        }
        gemm(T, HD, T, ds.data(), T, 1, kb, KVD, dq + b * T * QD + h * HD, QD, false);  // dQ
        gemm(T, HD, T, ds.data(), 1, T, qb, QD, dkb, KVD, true);                       // dK
        gemm(T, HD, T, p, 1, T, gob, QD, dvb, KVD, true);                               // dV
      }
    }
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------------

void swiglu_backward(const float* gate, const float* up, const float* dh, int64_t n, float* dgate, float* dup) {
  train_pool().parallel_for(static_cast<size_t>(n), 4096, [&](size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) {
      // h = g sigma(g) u;  dh/dg = sigma(g) (1 + g (1 - sigma(g))) u;  dh/du = g sigma(g)
      const float g = gate[i], sig = 1.0f / (1.0f + std::exp(-g));
      dgate[i] = dh[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
      dup[i] = dh[i] * g * sig;
    }
  });
}

// ---- LM head + loss ------------------------------------------------------------------------------

std::vector<int64_t> counted_rows(const LossTargets& t, int64_t n) {
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < n; ++r) {
    const bool counts = t.targets ? t.targets[r] >= 0 : (!t.distill.mask || t.distill.mask[r]);
    if (counts) rows.push_back(r);
  }
  return rows;
}

namespace {

bool all_finite(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.0f;  // NaN or Inf make it NaN
  return acc == 0.0f;
}

// Cross-entropy of one row of (finite) logits against `target`, with its gradient times `scale`.
OSD_SIMD_CLONES double cross_entropy_row(const float* logits, int64_t vocab, int32_t target, float scale, float* grad) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, logits[j]);
  double sum = 0.0;
  for (int64_t j = 0; j < vocab; ++j) sum += (grad[j] = exp_approx(logits[j] - mx));
  const double log_z = mx + std::log(sum);
  const float inv = static_cast<float>(scale / sum);
  for (int64_t j = 0; j < vocab; ++j) grad[j] *= inv;
  grad[target] -= scale;
  return log_z - logits[target];
}

}  // namespace

void validate_loss_targets(const LossTargets& t, int64_t n, int64_t vocab) {
  if (t.targets) {
    for (int64_t r = 0; r < n; ++r)
      if (t.targets[r] < -1 || t.targets[r] >= vocab)
        throw_range("targets[" + std::to_string(r) + "] = " + std::to_string(t.targets[r]) +
                    " is out of range for vocabSize " + std::to_string(vocab) + " (-1 skips a position)");
  } else {
    DistillInput all = t.distill;
    all.rows = static_cast<int32_t>(n);
    all.vocab = static_cast<int32_t>(vocab);
    if (!all.teacher && (!all.topk_ids || !all.topk_probs || all.k <= 0))
      throw_range("a distillation batch needs teacher logits or a top-k teacher");
    validate_distill(all);
  }
}

double head_loss(const float* x, int64_t n, const float* w, int64_t vocab, int64_t dim, const LossTargets& t,
                 int64_t chunk, float* dx, float* dw) {
  if (chunk <= 0) throw_range("chunk must be > 0");
  validate_loss_targets(t, n, vocab);
  if (dx) std::fill(dx, dx + n * dim, 0.0f);
  const std::vector<int64_t> rows = counted_rows(t, n);
  const int64_t count = static_cast<int64_t>(rows.size());
  if (count == 0) return 0.0;
  const float scale = 1.0f / static_cast<float>(count);
  const int64_t cmax = std::min(chunk, count);
  std::vector<float> xg(static_cast<size_t>(cmax * dim)), logits(static_cast<size_t>(cmax * vocab)),
      dlogits(static_cast<size_t>(cmax * vocab)), dxg(dx ? static_cast<size_t>(cmax * dim) : 0);
  std::vector<double> row_loss(static_cast<size_t>(count));
  for (int64_t c0 = 0; c0 < count; c0 += cmax) {
    const int64_t cs = std::min(cmax, count - c0);
    for (int64_t i = 0; i < cs; ++i) std::memcpy(&xg[i * dim], x + rows[c0 + i] * dim, dim * sizeof(float));
    linear_forward(w, vocab, dim, xg.data(), cs, logits.data());
    train_pool().parallel_for(static_cast<size_t>(cs), 1, [&](size_t lo, size_t hi) {
      for (size_t i = lo; i < hi; ++i) {
        const int64_t r = rows[c0 + i];
        const float* l = &logits[i * vocab];
        float* g = &dlogits[i * vocab];
        if (!all_finite(l, vocab)) {
          // A diverged model: the loss is NaN (the trainer then skips the update), not an error.
          row_loss[c0 + i] = NAN;
          std::fill(g, g + vocab, 0.0f);
        } else if (t.targets) {
          row_loss[c0 + i] = cross_entropy_row(l, vocab, t.targets[r], scale, g);
        } else {
          // One row of the caller's teacher, scored as the CPU backend scores it (distill/losses.cpp).
          DistillInput one = t.distill;
          one.student = l;
          one.rows = 1;
          one.vocab = static_cast<int32_t>(vocab);
          one.mask = nullptr;
          if (one.teacher) one.teacher += r * vocab;
          if (one.topk_ids) one.topk_ids += r * one.k;
          if (one.topk_probs) one.topk_probs += r * one.k;
          if (one.residual) one.residual += r;
          if (t.topk_count) one.k = t.topk_count[r];
          row_loss[c0 + i] = distill_row_fast(one, 0, scale, g);
        }
      }
    });
    if (dx) {
      gemm(cs, dim, vocab, dlogits.data(), vocab, 1, w, dim, dxg.data(), dim, false);
      for (int64_t i = 0; i < cs; ++i) std::memcpy(dx + rows[c0 + i] * dim, &dxg[i * dim], dim * sizeof(float));
    }
    if (dw) gemm(vocab, dim, cs, dlogits.data(), 1, vocab, xg.data(), dim, dw, dim, true);
  }
  double total = 0.0;
  for (double l : row_loss) total += l;
  return total / static_cast<double>(count);
}

}  // namespace osd::train
