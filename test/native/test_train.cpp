// Native tests of training (native/train): every op's backward against central finite
// differences, the whole model's gradient against finite differences of an independent
// double-precision reference model, bitwise parity of the training forward with the inference
// pass, overfitting, distillation, and checkpoint resume.
//
// Finite differences are taken of double-precision reference functions (h = 1e-4 for the whole
// model, 1e-3 for single ops), so their own error is ~1e-8 and the tolerances below measure the
// f32 analytic gradients alone: |analytic - fd| <= 1e-6 + 1e-5 |fd| per op, 2e-6 + 1e-4 |fd| for
// the whole model. Each check prints how much of its tolerance it used.
//
// Build by hand (until CMake globs native/train), after building build-cmake/libosd_engine.a:
//   g++ -std=gnu++17 -O2 -Inative -Itest/native native/train/*.cpp test/native/test_train.cpp
//       build-cmake/libosd_engine.a -lpthread -o /tmp/test_train
// Throughput: OSD_TRAIN_BENCH=1 /tmp/test_train bench
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backend/backend.h"
#include "check.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/model.h"
#include "model/sequence.h"
#include "train/params.h"
#include "train/train_model.h"
#include "train/train_ops.h"
#include "train/trainer.h"

using namespace osd;
using namespace osd::train;

namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<int32_t> rand_ids(size_t n, int32_t vocab, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

std::string temp_path(const char* name) {
  return "/tmp/osd_test_train_" + std::to_string(getpid()) + "_" + name;
}

// Compares an analytic gradient with finite differences: |g - fd| <= atol + rtol |fd| for every
// entry; prints the worst relative error so the margin is visible.
struct GradCheck {
  const char* what;
  double atol, rtol;
  double worst = 0.0;
  int bad = 0, n = 0;
  void add(double g, double fd) {
    ++n;
    const double err = std::fabs(g - fd), rel = err / (atol + rtol * std::fabs(fd));
    worst = std::max(worst, rel);
    if (rel > 1.0) {
      if (bad < 5) std::printf("    %s: analytic %.8g vs fd %.8g\n", what, g, fd);
      ++bad;
    }
  }
  void done() {
    std::printf("    %-28s %4d entries, worst error %.3f of tolerance\n", what, n, worst);
    CHECK_EQ(bad, 0);
  }
};

// Central difference of f at x[i], in double.
template <class F>
double central(std::vector<double>& x, size_t i, double h, F f) {
  const double keep = x[i];
  x[i] = keep + h;
  const double up = f();
  x[i] = keep - h;
  const double down = f();
  x[i] = keep;
  return (up - down) / (2.0 * h);
}

// ---- Double-precision reference ops and model ---------------------------------------------------

namespace ref {

void rmsnorm(const double* x, const double* w, int64_t D, double eps, double* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const double r = 1.0 / std::sqrt(ss / D + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * x[i] * r;
}

void rope(double* v, int64_t hd, int64_t pos, double theta, double fscale, bool neox, const float* factors = nullptr) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double ang = pos * std::pow(theta, -2.0 * i / hd) * fscale / (factors ? factors[i] : 1.0);
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const double x0 = v[a], x1 = v[b];
    v[a] = x0 * std::cos(ang) - x1 * std::sin(ang);
    v[b] = x0 * std::sin(ang) + x1 * std::cos(ang);
  }
}

// y[n x out] = x[n x in] w^T
void linear(const double* w, int64_t out, int64_t in, const double* x, int64_t n, double* y) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < out; ++r) {
      double s = 0.0;
      for (int64_t k = 0; k < in; ++k) s += w[r * in + k] * x[t * in + k];
      y[t * out + r] = s;
    }
}

void attention(const AttnShape& s, const double* q, const double* k, const double* v, double* out) {
  const int64_t T = s.seq, H = s.n_heads, HD = s.head_dim, QD = H * HD, KVD = s.n_kv_heads * HD;
  const int64_t group = H / s.n_kv_heads;
  std::vector<double> p(T);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const double* qi = q + (b * T + i) * QD + h * HD;
        double mx = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* kj = k + (b * T + j) * KVD + (h / group) * HD;
          double d = 0.0;
          for (int64_t e = 0; e < HD; ++e) d += qi[e] * kj[e];
          p[j] = d / std::sqrt(static_cast<double>(HD));
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        double* o = out + (b * T + i) * QD + h * HD;
        for (int64_t e = 0; e < HD; ++e) o[e] = 0.0;
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t e = 0; e < HD; ++e) o[e] += p[j] / sum * v[(b * T + j) * KVD + (h / group) * HD + e];
      }
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// Logits (B*T x vocab) of the model whose parameters (layout L) are p.
std::vector<double> logits(const ParamLayout& L, const std::vector<double>& p, const std::vector<int32_t>& tokens,
                           int32_t B, int32_t T) {
  const ModelConfig& c = L.config();
  const int64_t N = static_cast<int64_t>(B) * T, D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim;
  std::vector<double> x(N * D), xn(N * D), q(N * QD), k(N * KVD), v(N * KVD), att(N * QD), tmp(N * D), g(N * F),
      u(N * F);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < D; ++j) x[n * D + j] = p[L.token_embd() + tokens[n] * D + j];
  const AttnShape shape{B, T, c.n_heads, c.n_kv_heads, c.head_dim};
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerOffsets& o = L.layer(l);
    for (int64_t n = 0; n < N; ++n) rmsnorm(&x[n * D], &p[o.attn_norm], D, c.rms_eps, &xn[n * D]);
    linear(&p[o.wq], QD, D, xn.data(), N, q.data());
    linear(&p[o.wk], KVD, D, xn.data(), N, k.data());
    linear(&p[o.wv], KVD, D, xn.data(), N, v.data());
    for (int64_t n = 0; n < N; ++n) {
      if (L.qkv_bias()) {
        for (int64_t j = 0; j < QD; ++j) q[n * QD + j] += p[o.bq + j];
        for (int64_t j = 0; j < KVD; ++j) k[n * KVD + j] += p[o.bk + j], v[n * KVD + j] += p[o.bv + j];
      }
      if (L.qk_norm()) {
        for (int32_t h = 0; h < c.n_heads; ++h) {
          double* qh = &q[n * QD + h * c.head_dim];
          std::vector<double> in(qh, qh + c.head_dim);
          rmsnorm(in.data(), &p[o.q_norm], c.head_dim, c.rms_eps, qh);
        }
        for (int32_t h = 0; h < c.n_kv_heads; ++h) {
          double* kh = &k[n * KVD + h * c.head_dim];
          std::vector<double> in(kh, kh + c.head_dim);
          rmsnorm(in.data(), &p[o.k_norm], c.head_dim, c.rms_eps, kh);
        }
      }
      const float* ff = c.rope_factors.empty() ? nullptr : c.rope_factors.data();
      for (int32_t h = 0; h < c.n_heads; ++h)
        rope(&q[n * QD + h * c.head_dim], c.head_dim, n % T, c.rope_theta, c.rope_freq_scale, c.rope_neox, ff);
      for (int32_t h = 0; h < c.n_kv_heads; ++h)
        rope(&k[n * KVD + h * c.head_dim], c.head_dim, n % T, c.rope_theta, c.rope_freq_scale, c.rope_neox, ff);
    }
    attention(shape, q.data(), k.data(), v.data(), att.data());
    linear(&p[o.wo], D, QD, att.data(), N, tmp.data());
    for (int64_t j = 0; j < N * D; ++j) x[j] += tmp[j];
    for (int64_t n = 0; n < N; ++n) rmsnorm(&x[n * D], &p[o.ffn_norm], D, c.rms_eps, &xn[n * D]);
    linear(&p[o.w_gate], F, D, xn.data(), N, g.data());
    linear(&p[o.w_up], F, D, xn.data(), N, u.data());
    for (int64_t j = 0; j < N * F; ++j) g[j] = silu(g[j]) * u[j];
    linear(&p[o.w_down], D, F, g.data(), N, tmp.data());
    for (int64_t j = 0; j < N * D; ++j) x[j] += tmp[j];
  }
  for (int64_t n = 0; n < N; ++n) rmsnorm(&x[n * D], &p[L.output_norm()], D, c.rms_eps, &xn[n * D]);
  std::vector<double> out(N * c.vocab);
  linear(&p[L.output()], c.vocab, D, xn.data(), N, out.data());
  return out;
}

double log_softmax_at(const double* l, int64_t V, int64_t j) {
  double mx = -INFINITY, s = 0.0;
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, l[i]);
  for (int64_t i = 0; i < V; ++i) s += std::exp(l[i] - mx);
  return l[j] - mx - std::log(s);
}

// Mean cross-entropy (targets) or mean forward KL against dense teacher logits (temperature 1,
// mask), over counted rows.
double loss(const std::vector<double>& logits, int64_t V, const LossTargets& t, int64_t n) {
  double total = 0.0;
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double* l = &logits[r * V];
    if (t.targets) {
      if (t.targets[r] < 0) continue;
      total -= log_softmax_at(l, V, t.targets[r]);
    } else {
      if (t.distill.mask && !t.distill.mask[r]) continue;
      std::vector<double> te(t.distill.teacher + r * V, t.distill.teacher + (r + 1) * V);
      for (int64_t j = 0; j < V; ++j) {
        const double lp = log_softmax_at(te.data(), V, j);
        total += std::exp(lp) * (lp - log_softmax_at(l, V, j));
      }
    }
    ++count;
  }
  return count ? total / count : 0.0;
}

}  // namespace ref

ModelConfig tiny_config(bool tied = true, bool qwen = false) {
  ModelConfig c;
  c.arch = qwen ? "qwen2" : "llama";
  c.rope_neox = qwen;
  c.vocab = 37;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_dim = 24;
  c.context = 64;
  c.tied_output = tied;
  return c;
}

// qwen3: per-head query and key norms, NeoX RoPE, no biases.
ModelConfig tiny_qwen3(bool tied = true) {
  ModelConfig c = tiny_config(tied, true);
  c.arch = "qwen3";
  return c;
}

// Llama 3.1's RoPE factors, one per rotated pair (head_dim 4: two).
ModelConfig with_rope_factors(ModelConfig c) {
  c.rope_factors = {1.0f, 3.5f};
  return c;
}

// Random weights with some spread everywhere (norm weights and biases too), so every path carries
// gradient.
Params spread_params(const ModelConfig& c, uint64_t seed, float std = 0.3f) {
  Params p = Params::random(c, seed, std);
  std::vector<float> noise = randn(p.size(), static_cast<uint32_t>(seed) + 7, 0.1f);
  for (size_t i = p.layout().decay_end(); i < p.size(); ++i) p.data()[i] += noise[i];
  return p;
}

}  // namespace

// ---- Matrix products ------------------------------------------------------------------------------

OSD_TEST(linear_forward_is_bitwise_inference_matmul) {
  // Shapes with every tile edge, and an input width that is not a multiple of 8 (fallback path).
  for (int64_t in : {8, 64, 172, 256})
    for (int64_t out : {1, 5, 37, 100})
      for (int64_t n : {1, 3, 7, 70}) {
        auto w = randn(out * in, 1), x = randn(n * in, 2);
        std::vector<float> y(n * out), ref(n * out);
        linear_forward(w.data(), out, in, x.data(), n, y.data());
        matmul(matrix_f32(w.data(), out, in), x.data(), n, ref.data());
        int diff = 0;
        for (size_t i = 0; i < y.size(); ++i) diff += y[i] != ref[i];
        CHECK_EQ(diff, 0);
      }
}

OSD_TEST(gemm_matches_double_reference) {
  double gemm_worst = 0.0;
  // C = A B with A given directly and transposed, tile edges in every dimension, K past one block.
  for (int64_t M : {1, 6, 13, 50})
    for (int64_t N : {1, 16, 24, 40, 130})
      for (int64_t K : {1, 7, 300}) {
        auto a = randn(M * K, 3), b = randn(K * N, 4), c0 = randn(M * N, 5);
        for (bool trans : {false, true})
          for (bool acc : {false, true}) {
            std::vector<float> c = c0;
            // trans: A is stored as K x M (A(i,k) = a[k * M + i]).
            gemm(M, N, K, a.data(), trans ? 1 : K, trans ? M : 1, b.data(), N, c.data(), N, acc);
            // Error relative to sum |a_ik b_kj| (the f32 bound is K * 6e-8 of it; typical is far less).
            double worst = 0.0;
            for (int64_t i = 0; i < M; ++i)
              for (int64_t j = 0; j < N; ++j) {
                double s = acc ? c0[i * N + j] : 0.0, mag = std::fabs(s);
                for (int64_t k = 0; k < K; ++k) {
                  const double ab = double(a[trans ? k * M + i : i * K + k]) * b[k * N + j];
                  s += ab;
                  mag += std::fabs(ab);
                }
                worst = std::max(worst, std::fabs(s - c[i * N + j]) / (mag + 1e-30));
              }
            gemm_worst = std::max(gemm_worst, worst);
          }
      }
  std::printf("    worst error %.2e of sum |a b|\n", gemm_worst);
  CHECK(gemm_worst < 1e-6);
}

OSD_TEST(linear_backward_vs_finite_differences) {
  // L = sum r . (x W^T): dL/dx = r W, dL/dW = r^T x.
  const int64_t out = 11, in = 24, n = 5;
  auto w = randn(out * in, 6), x = randn(n * in, 7), r = randn(n * out, 8);
  std::vector<float> dx(n * in), dw(out * in, 0.0f);
  linear_backward(w.data(), out, in, x.data(), r.data(), n, dx.data(), false, dw.data());
  auto wd = to_double(w), xd = to_double(x);
  auto L = [&] {
    std::vector<double> y(n * out);
    ref::linear(wd.data(), out, in, xd.data(), n, y.data());
    double s = 0.0;
    for (size_t i = 0; i < y.size(); ++i) s += r[i] * y[i];
    return s;
  };
  GradCheck gx{"linear dx", 1e-6, 1e-5}, gw{"linear dw", 1e-6, 1e-5};
  for (size_t i = 0; i < xd.size(); ++i) gx.add(dx[i], central(xd, i, 1e-3, L));
  for (size_t i = 0; i < wd.size(); ++i) gw.add(dw[i], central(wd, i, 1e-3, L));
  gx.done();
  gw.done();
}

// ---- RMSNorm, RoPE, SwiGLU ------------------------------------------------------------------------

OSD_TEST(rmsnorm_backward_vs_finite_differences) {
  const int64_t n = 4, D = 24;
  auto x = randn(n * D, 9), w = randn(D, 10), r = randn(n * D, 11);
  for (auto& v : w) v += 1.0f;
  std::vector<float> y(n * D), rstd(n), dx(n * D), dw(D, 0.0f);
  rmsnorm_forward(x.data(), w.data(), n, D, 1e-5f, y.data(), rstd.data());
  rmsnorm_backward(x.data(), w.data(), rstd.data(), r.data(), n, D, dx.data(), false, dw.data());
  auto xd = to_double(x), wd = to_double(w);
  auto L = [&] {
    double s = 0.0;
    std::vector<double> yr(D);
    for (int64_t t = 0; t < n; ++t) {
      ref::rmsnorm(&xd[t * D], wd.data(), D, 1e-5, yr.data());
      for (int64_t i = 0; i < D; ++i) s += r[t * D + i] * yr[i];
    }
    return s;
  };
  GradCheck gx{"rmsnorm dx", 1e-6, 1e-5}, gw{"rmsnorm dw", 1e-6, 1e-5};
  for (size_t i = 0; i < xd.size(); ++i) gx.add(dx[i], central(xd, i, 1e-3, L));
  for (size_t i = 0; i < wd.size(); ++i) gw.add(dw[i], central(wd, i, 1e-3, L));
  gx.done();
  gw.done();
  // The forward is osd::rmsnorm itself.
  std::vector<float> y1(D);
  rmsnorm(&x[D], w.data(), D, 1e-5f, y1.data());
  CHECK(std::equal(y1.begin(), y1.end(), y.begin() + D));
}

OSD_TEST(rope_bitwise_and_backward) {
  for (bool neox : {false, true}) {
    ModelConfig c = tiny_config(true, neox);
    c.head_dim = 16;
    c.rope_theta = 10000.0f;
    c.rope_freq_scale = 0.5f;
    RopeTable t = rope_table(c, 40);
    // Forward: bitwise osd::rope.
    int diff = 0;
    for (int64_t pos : {0, 1, 17, 39}) {
      auto v = randn(16, 12 + pos), u = v;
      rope_apply(t, v.data(), pos);
      rope(u.data(), 16, pos, c.rope_theta, c.rope_freq_scale, neox);
      for (int i = 0; i < 16; ++i) diff += v[i] != u[i];
    }
    CHECK_EQ(diff, 0);
    // Backward against finite differences of the double rotation.
    const int64_t pos = 29;
    auto x = randn(16, 13), r = randn(16, 14);
    std::vector<float> g = r;
    rope_backward(t, g.data(), pos);
    auto xd = to_double(x);
    auto L = [&] {
      std::vector<double> v = xd;
      ref::rope(v.data(), 16, pos, c.rope_theta, c.rope_freq_scale, neox);
      double s = 0.0;
      for (int i = 0; i < 16; ++i) s += r[i] * v[i];
      return s;
    };
    GradCheck gc{neox ? "rope (neox) dx" : "rope (pairs) dx", 1e-6, 1e-5};
    for (size_t i = 0; i < 16; ++i) gc.add(g[i], central(xd, i, 1e-3, L));
    gc.done();
  }
}

OSD_TEST(swiglu_backward_vs_finite_differences) {
  const int64_t n = 64;
  auto g = randn(n, 15, 3.0f), u = randn(n, 16), r = randn(n, 17);
  std::vector<float> dg(n), du(n);
  swiglu_backward(g.data(), u.data(), r.data(), n, dg.data(), du.data());
  auto gd = to_double(g), ud = to_double(u);
  auto L = [&] {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += r[i] * ref::silu(gd[i]) * ud[i];
    return s;
  };
  GradCheck cg{"swiglu dgate", 1e-6, 1e-5}, cu{"swiglu dup", 1e-6, 1e-5};
  for (int64_t i = 0; i < n; ++i) cg.add(dg[i], central(gd, i, 1e-3, L));
  for (int64_t i = 0; i < n; ++i) cu.add(du[i], central(ud, i, 1e-3, L));
  cg.done();
  cu.done();
}

// ---- Attention ------------------------------------------------------------------------------------

OSD_TEST(attention_forward_and_backward) {
  const AttnShape s{2, 6, 4, 2, 8};  // GQA: two query heads per kv head
  const int64_t N = s.batch * s.seq, QD = s.n_heads * s.head_dim, KVD = s.n_kv_heads * s.head_dim;
  auto q = randn(N * QD, 18), k = randn(N * KVD, 19), v = randn(N * KVD, 20), r = randn(N * QD, 21);
  std::vector<float> probs(s.batch * s.n_heads * s.seq * s.seq), out(N * QD);
  attention_forward(s, q.data(), k.data(), v.data(), probs.data(), out.data());
  auto qd = to_double(q), kd = to_double(k), vd = to_double(v);
  std::vector<double> od(N * QD);
  ref::attention(s, qd.data(), kd.data(), vd.data(), od.data());
  double worst = 0.0;
  for (int64_t i = 0; i < N * QD; ++i) worst = std::max(worst, std::fabs(od[i] - out[i]));
  CHECK(worst < 1e-5);

  std::vector<float> dq(N * QD), dk(N * KVD), dv(N * KVD);
  attention_backward(s, q.data(), k.data(), v.data(), probs.data(), r.data(), dq.data(), dk.data(), dv.data());
  auto L = [&] {
    ref::attention(s, qd.data(), kd.data(), vd.data(), od.data());
    double t = 0.0;
    for (int64_t i = 0; i < N * QD; ++i) t += r[i] * od[i];
    return t;
  };
  GradCheck cq{"attention dq", 1e-6, 1e-5}, ck{"attention dk", 1e-6, 1e-5}, cv{"attention dv", 1e-6, 1e-5};
  for (size_t i = 0; i < qd.size(); ++i) cq.add(dq[i], central(qd, i, 1e-3, L));
  for (size_t i = 0; i < kd.size(); ++i) ck.add(dk[i], central(kd, i, 1e-3, L));
  for (size_t i = 0; i < vd.size(); ++i) cv.add(dv[i], central(vd, i, 1e-3, L));
  cq.done();
  ck.done();
  cv.done();
}

// ---- LM head + loss -------------------------------------------------------------------------------

OSD_TEST(head_cross_entropy_vs_finite_differences) {
  const int64_t n = 9, D = 16, V = 37;
  auto x = randn(n * D, 22), w = randn(V * D, 23, 0.5f);
  std::vector<int32_t> targets = rand_ids(n, V, 24);
  targets[2] = targets[7] = -1;  // not counted
  LossTargets t;
  t.targets = targets.data();
  auto xd = to_double(x), wd = to_double(w);
  auto L = [&] {
    std::vector<double> logits(n * V);
    ref::linear(wd.data(), V, D, xd.data(), n, logits.data());
    return ref::loss(logits, V, t, n);
  };
  for (int64_t chunk : {64, 3}) {  // one chunk, and several with a ragged last one
    std::vector<float> dx(n * D), dw(V * D, 0.0f);
    const double loss = head_loss(x.data(), n, w.data(), V, D, t, chunk, dx.data(), dw.data());
    CHECK_NEAR(loss, L(), 1e-5);
    GradCheck gx{"head CE dx", 1e-6, 1e-5}, gw{"head CE dw", 1e-6, 1e-5};
    for (size_t i = 0; i < xd.size(); ++i) gx.add(dx[i], central(xd, i, 1e-3, L));
    for (size_t i = 0; i < wd.size(); i += 3) gw.add(dw[i], central(wd, i, 1e-3, L));
    gx.done();
    gw.done();
    for (int64_t j = 0; j < D; ++j) CHECK_EQ(dx[2 * D + j], 0.0f);
  }
}

OSD_TEST(head_distill_chunked_equals_unchunked) {
  // The fused head must give what the plain path gives: all logits, cpu_backend().distill_loss,
  // then dx = dlogits W and dW = dlogits^T x.
  const int64_t n = 11, D = 16, V = 53, k = 4;
  auto x = randn(n * D, 25), w = randn(V * D, 26, 0.5f), teacher = randn(n * V, 27, 2.0f);
  std::vector<uint8_t> mask(n, 1);
  mask[0] = mask[5] = 0;
  // A sparse teacher: distinct ids, probabilities plus residual summing to 1.
  std::vector<int32_t> ids(n * k);
  std::vector<float> probs(n * k);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) ids[r * k + i] = static_cast<int32_t>((r * 7 + i * 13) % V), probs[r * k + i] = 0.2f;
  for (DistillKind kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD})
    for (bool sparse : {false, true}) {
      LossTargets t;
      t.distill.kind = kind;
      t.distill.temperature = 1.5f;
      t.distill.mask = mask.data();
      if (sparse) {
        t.distill.topk_ids = ids.data();
        t.distill.topk_probs = probs.data();
        t.distill.k = static_cast<int32_t>(k);
      } else {
        t.distill.teacher = teacher.data();
      }
      std::vector<float> dx(n * D), dw(V * D, 0.0f);
      const double loss = head_loss(x.data(), n, w.data(), V, D, t, 4, dx.data(), dw.data());
      std::vector<float> logits(n * V), dl(n * V), dx2(n * D, 0.0f), dw2(V * D, 0.0f);
      matmul(matrix_f32(w.data(), V, D), x.data(), n, logits.data());
      DistillInput in = t.distill;
      in.student = logits.data();
      in.rows = static_cast<int32_t>(n);
      in.vocab = static_cast<int32_t>(V);
      const double loss2 = cpu_backend().distill_loss(in, dl.data());
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < V; ++j)
          for (int64_t d = 0; d < D; ++d) {
            dx2[r * D + d] += dl[r * V + j] * w[j * D + d];
            dw2[j * D + d] += dl[r * V + j] * x[r * D + d];
          }
      CHECK_NEAR(loss, loss2, 1e-6 * (1.0 + std::fabs(loss2)));
      double worst = 0.0;
      for (size_t i = 0; i < dx.size(); ++i) worst = std::max(worst, double(std::fabs(dx[i] - dx2[i])));
      for (size_t i = 0; i < dw.size(); ++i) worst = std::max(worst, double(std::fabs(dw[i] - dw2[i])));
      CHECK(worst < 1e-6);
    }
}

// ---- The whole model ------------------------------------------------------------------------------

namespace {

// Analytic f32 gradient of the batch loss against central differences (h = 1e-4) of the double
// reference model, on `per_tensor` sampled entries of every tensor. `ref_loss` scores the reference
// logits (default ref::loss).
void check_model_gradient(const ModelConfig& c, const LossTargets& lt, const std::vector<int32_t>& tokens, int32_t B,
                          int32_t T, const char* what,
                          std::function<double(const std::vector<double>&)> ref_loss = nullptr) {
  Params p = spread_params(c, 42);
  Activations acts;
  std::vector<float> grads(p.size());
  Batch b;
  b.batch = B;
  b.seq_len = T;
  b.tokens = tokens.data();
  b.loss = lt;
  const double loss = forward_backward(p, b, acts, grads.data());
  std::vector<double> pd(p.data(), p.data() + p.size());
  auto L = [&] {
    const std::vector<double> l = ref::logits(p.layout(), pd, tokens, B, T);
    return ref_loss ? ref_loss(l) : ref::loss(l, c.vocab, lt, int64_t(B) * T);
  };
  CHECK_NEAR(loss, L(), 1e-5);
  // Tolerance 2e-6 absolute + 1e-4 relative (typical entries are 1e-3 to 1e-1): the f32
  // gradient's rounding uses a few percent of it, while a wrong term (a missing factor, a
  // transposed index, a dropped path) is off by orders of magnitude more.
  GradCheck gc{what, 2e-6, 1e-4};
  std::mt19937 rng(99);
  for (const ParamTensor& t : p.layout().tensors()) {
    std::uniform_int_distribution<size_t> pick(0, t.size() - 1);
    for (int s = 0; s < 6; ++s) {
      const size_t i = t.offset + pick(rng);
      gc.add(grads[i], central(pd, i, 1e-4, L));
    }
  }
  gc.done();
}

}  // namespace

OSD_TEST(model_gradient_cross_entropy) {
  const int32_t B = 2, T = 7;
  const char* names[] = {"model CE (tied)", "model CE (untied)", "model CE (qwen2)", "model CE (qwen3)",
                         "model CE (RoPE factors)"};
  for (int variant = 0; variant < 5; ++variant) {
    // tied llama, untied llama, qwen2 (NeoX RoPE and QKV biases), qwen3 (query and key head norms),
    // untied llama with RoPE factors
    ModelConfig c = variant == 3 ? tiny_qwen3() : variant == 4 ? with_rope_factors(tiny_config(false))
                                                               : tiny_config(variant != 1, variant == 2);
    auto tokens = rand_ids(B * T, c.vocab, 30 + variant);
    auto targets = rand_ids(B * T, c.vocab, 40 + variant);
    targets[3] = -1;
    LossTargets lt;
    lt.targets = targets.data();
    check_model_gradient(c, lt, tokens, B, T, names[variant]);
  }
}

OSD_TEST(model_gradient_forward_kl) {
  const int32_t B = 2, T = 7;
  ModelConfig c = tiny_config(false);
  auto tokens = rand_ids(B * T, c.vocab, 50);
  auto teacher = randn(B * T * c.vocab, 51, 2.0f);
  std::vector<uint8_t> mask(B * T, 1);
  mask[0] = mask[9] = 0;
  LossTargets lt;
  lt.distill.kind = DistillKind::ForwardKL;
  lt.distill.teacher = teacher.data();
  lt.distill.mask = mask.data();
  check_model_gradient(c, lt, tokens, B, T, "model forward-KL (untied)");
}

namespace {

// A restricted head's loss in double, from full reference logits: the student's and the teacher's
// distributions over the head's ids only. Cross-entropy rows whose target is outside the head do not
// count; a sparse teacher keeps its listed ids inside the head, renormalised with its rest (taken to
// lie inside the head) and compared on those bins plus the rest, or with k >= the head's size, the
// rest spread evenly over the head's unlisted ids; rows with no listed id inside do not count.
double restricted_loss(const std::vector<double>& logits, const ModelConfig& c, const LossTargets& t, int64_t n) {
  const std::vector<int32_t>& ids = c.head_tokens;
  const int64_t V = c.vocab, H = static_cast<int64_t>(ids.size());
  std::vector<int32_t> at(V, -1);
  for (int64_t j = 0; j < H; ++j) at[ids[j]] = static_cast<int32_t>(j);
  double total = 0.0;
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    std::vector<double> s(H);
    for (int64_t j = 0; j < H; ++j) s[j] = logits[r * V + ids[j]];
    if (t.targets) {
      if (t.targets[r] < 0 || at[t.targets[r]] < 0) continue;
      total -= ref::log_softmax_at(s.data(), H, at[t.targets[r]]);
    } else if (t.distill.teacher) {
      std::vector<double> te(H);
      for (int64_t j = 0; j < H; ++j) te[j] = t.distill.teacher[r * V + ids[j]];
      for (int64_t j = 0; j < H; ++j) {
        const double lp = ref::log_softmax_at(te.data(), H, j);
        total += std::exp(lp) * (lp - ref::log_softmax_at(s.data(), H, j));
      }
    } else {
      const int64_t k = t.distill.k;
      std::vector<double> p(H, -1.0);  // -1: not listed
      double kept = 0.0, listed = 0.0;
      int64_t e = 0;
      for (int64_t i = 0; i < k; ++i) {
        const int32_t id = t.distill.topk_ids[r * k + i];
        const double pr = t.distill.topk_probs[r * k + i];
        listed += pr;
        if (at[id] >= 0) p[at[id]] = pr, kept += pr, ++e;
      }
      if (e == 0) continue;
      const double rest = e == H ? 0.0 : t.distill.residual ? t.distill.residual[r] : 1.0 - listed;
      const double share = kept + rest;
      std::vector<double> q(H);
      double mx = -INFINITY, z = 0.0;
      for (double v : s) mx = std::max(mx, v);
      for (int64_t j = 0; j < H; ++j) z += (q[j] = std::exp(s[j] - mx));
      for (double& v : q) v /= z;
      if (k >= H) {
        for (int64_t j = 0; j < H; ++j) {
          const double pj = p[j] >= 0 ? p[j] / share : rest / share / static_cast<double>(H - e);
          if (pj > 0) total += pj * std::log(pj / q[j]);
        }
      } else {
        double q_listed = 0.0;
        for (int64_t j = 0; j < H; ++j)
          if (p[j] >= 0) {
            q_listed += q[j];
            if (p[j] > 0) total += p[j] / share * std::log(p[j] / share / q[j]);
          }
        if (rest > 0) total += rest / share * std::log(rest / share / (1.0 - q_listed));
      }
    }
    ++count;
  }
  return count ? total / count : 0.0;
}

}  // namespace

OSD_TEST(restricted_head_gradient_and_loss) {
  // A head of 25 of the 37 ids: its loss and gradient against the double reference, for
  // cross-entropy, a dense teacher and sparse teachers (k below and above the head's size).
  const int32_t B = 2, T = 7, N = B * T;
  for (const bool tied : {true, false}) {
    ModelConfig c = tiny_config(tied);
    for (int32_t id = 0; id < c.vocab; ++id)
      if (id % 3 != 1) c.head_tokens.push_back(id);
    const int32_t V = c.vocab;
    auto tokens = rand_ids(N, V, 70);
    auto targets = rand_ids(N, V, 71);  // about a third outside the head
    targets[2] = -1;
    LossTargets ce;
    ce.targets = targets.data();
    auto ref_of = [&](const LossTargets& lt) {
      return [&c, lt](const std::vector<double>& l) { return restricted_loss(l, c, lt, int64_t(B) * T); };
    };
    check_model_gradient(c, ce, tokens, B, T, tied ? "restricted CE (tied)" : "restricted CE (untied)", ref_of(ce));

    auto teacher = randn(N * V, 72, 2.0f);
    LossTargets dense;
    dense.distill.teacher = teacher.data();
    check_model_gradient(c, dense, tokens, B, T, tied ? "restricted dense KL (tied)" : "restricted dense KL (untied)",
                         ref_of(dense));

    for (const int32_t k : {6, 30}) {
      // Top-k of a random teacher, with its residual; row 4 lists only ids outside the head.
      std::vector<int32_t> ids(N * k);
      std::vector<float> probs(N * k), residual(N);
      for (int32_t r = 0; r < N; ++r) {
        std::vector<double> pr(V);
        double z = 0.0;
        for (int32_t j = 0; j < V; ++j) z += (pr[j] = std::exp(teacher[r * V + j]));
        std::vector<int32_t> order(V);
        for (int32_t j = 0; j < V; ++j) order[j] = j;
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return pr[a] > pr[b]; });
        if (r == 4 && k == 6)
          for (int32_t i = 0; i < k; ++i) order[i] = 1 + 3 * i;  // 1, 4, 7, ...: none in the head
        double sum = 0.0;
        for (int32_t i = 0; i < k; ++i) ids[r * k + i] = order[i], sum += (probs[r * k + i] = float(pr[order[i]] / z));
        residual[r] = float(std::max(0.0, 1.0 - sum));
      }
      LossTargets sparse;
      sparse.distill.topk_ids = ids.data();
      sparse.distill.topk_probs = probs.data();
      sparse.distill.residual = residual.data();
      sparse.distill.k = k;
      const std::string what = std::string("restricted top-") + std::to_string(k) + (tied ? " (tied)" : " (untied)");
      check_model_gradient(c, sparse, tokens, B, T, what.c_str(), ref_of(sparse));

      // A row that does not count is not read: garbage ids there (out of range, repeated) change
      // nothing, bit for bit.
      std::vector<uint8_t> mask(N, 1);
      mask[6] = 0;
      std::vector<int32_t> junk = ids;
      for (int32_t i = 0; i < k; ++i) junk[6 * k + i] = i % 2 ? -5 : 1 << 30;
      junk[6 * k + 1] = junk[6 * k + 2] = 3;
      Params p = spread_params(c, 42);
      Activations acts;
      Batch b;
      b.batch = B;
      b.seq_len = T;
      b.tokens = tokens.data();
      b.loss = sparse;
      b.loss.distill.mask = mask.data();
      std::vector<float> g1(p.size()), g2(p.size());
      const double l1 = forward_backward(p, b, acts, g1.data());
      b.loss.distill.topk_ids = junk.data();
      const double l2 = forward_backward(p, b, acts, g2.data());
      CHECK_EQ(l1, l2);
      CHECK(g1 == g2);
    }
  }
}

OSD_TEST(forward_logits_bitwise_equal_inference) {
  // The trainable model and the inference engine, over the same weights: bitwise equal logits.
  // Both run the same operations in the same order (the blocked f32 kernel keeps dot_f32's
  // 8-lane FMA chains and pairwise sum), and inference is batch invariant, so there is no reason
  // for a single ulp of difference.
  auto run = [](const Params& p, int32_t B, int32_t T) {
    std::shared_ptr<Model> m = p.to_model();
    const int32_t V = p.config().vocab;
    auto tokens = rand_ids(B * T, V, 60);
    std::vector<float> train(B * T * V), infer(B * T * V);
    forward_logits(p, tokens.data(), B, T, train.data());
    std::vector<float> half(B * T * V);
    for (int32_t b = 0; b < B; ++b) {
      Sequence s(m, 0, KvType::F32);  // the training forward keeps keys and values in float32
      s.evaluate(&tokens[b * T], T, nullptr, &infer[b * T * V]);
      Sequence h(m);  // the default float16 cache: close, not equal
      h.evaluate(&tokens[b * T], T, nullptr, &half[b * T * V]);
    }
    int diff = 0;
    float worst = 0, scale = 0;
    for (size_t i = 0; i < train.size(); ++i) {
      diff += train[i] != infer[i];
      if (!std::isfinite(train[i])) continue;  // a restricted head's -inf
      worst = std::max(worst, std::fabs(half[i] - train[i]));
      scale = std::max(scale, std::fabs(train[i]));
    }
    CHECK_EQ(diff, 0);
    CHECK(worst <= 0.02f * scale);
  };
  run(spread_params(tiny_config(true), 1), 3, 7);
  run(spread_params(tiny_config(false, true), 2), 2, 9);
  run(spread_params(tiny_qwen3(false), 4), 2, 9);
  run(spread_params(with_rope_factors(tiny_config(true)), 5), 2, 9);
  {
    ModelConfig r = tiny_config(false);  // a restricted head: the same logits there, -inf elsewhere
    r.head_tokens = {0, 3, 4, 10, 11, 12, 20, 36};
    run(spread_params(r, 6), 2, 9);
  }
  ModelConfig wide = tiny_config(false);
  wide.dim = 64, wide.n_heads = 8, wide.n_kv_heads = 4, wide.head_dim = 8, wide.ffn_dim = 172, wide.vocab = 300;
  run(Params::random(wide, 3, 0.1f), 2, 33);
  // A real checkpoint, copied in: stories260K (ffn 172 takes the non-multiple-of-8 path).
  const char* stories = "../shared/models/stories260K.bin";
  if (FILE* f = std::fopen(stories, "rb")) {
    std::fclose(f);
    std::shared_ptr<Model> m = Model::load(stories);
    Params p = Params::from_model(*m);
    run(p, 2, 40);
  } else {
    std::printf("    skip stories260K: %s not found\n", stories);
  }
}

OSD_TEST(gradients_do_not_depend_on_thread_count) {
  // Every sum has one fixed order whatever the split, so 1 and 3 threads give the same bits
  // (the 3 on a training pool of its own).
  ModelConfig c = tiny_config(false);
  c.dim = 64, c.head_dim = 16, c.ffn_dim = 96, c.vocab = 300;
  const int32_t B = 3, T = 20;
  Params p = spread_params(c, 11, 0.1f);
  auto tokens = rand_ids(B * T, c.vocab, 12), targets = rand_ids(B * T, c.vocab, 13);
  Batch b;
  b.batch = B;
  b.seq_len = T;
  b.tokens = tokens.data();
  b.loss.targets = targets.data();
  std::vector<float> g1(p.size()), g3(p.size());
  const int before = default_threads();
  Activations a1, a3;
  set_default_threads(1);
  const double l1 = forward_backward(p, b, a1, g1.data());
  set_train_threads(3);
  const double l3 = forward_backward(p, b, a3, g3.data());
  set_train_threads(0);
  set_default_threads(before);
  CHECK_EQ(l1, l3);
  CHECK(std::memcmp(g1.data(), g3.data(), g1.size() * sizeof(float)) == 0);
}

OSD_TEST(export_and_reload_round_trip_qwen3_and_rope_factors) {
  for (const ModelConfig& c : {tiny_qwen3(false), with_rope_factors(tiny_config(true))}) {
    Params p = spread_params(c, 6);
    const std::string path = temp_path("export-arch.gguf");
    p.save_gguf(path);
    std::shared_ptr<Model> m = Model::load(path);
    CHECK(m->config().arch == c.arch);
    CHECK(m->config().rope_factors == c.rope_factors);
    CHECK_EQ(m->layers[1].q_norm != nullptr, c.arch == "qwen3");
    Params q = Params::from_model(*m);
    CHECK_EQ(q.size(), p.size());
    CHECK(std::equal(p.data(), p.data() + p.size(), q.data()));
    std::remove(path.c_str());
  }
}

OSD_TEST(export_and_reload_round_trip) {
  Params p = spread_params(tiny_config(false, true), 5);
  p.metadata.push_back({"tokenizer.ggml.model", gguf::Value::str("gpt2")});
  const std::string path = temp_path("export.gguf");
  p.save_gguf(path);
  std::shared_ptr<Model> m = Model::load(path);
  CHECK(m->config().arch == "qwen2");
  CHECK(!m->config().tied_output);
  CHECK(m->gguf()->find("tokenizer.ggml.model") != nullptr);
  Params q = Params::from_model(*m);
  CHECK_EQ(q.size(), p.size());
  CHECK(std::equal(p.data(), p.data() + p.size(), q.data()));
  CHECK_EQ(q.metadata.size(), size_t(1));
  // F16 export loads and stays close.
  p.save_gguf(path, gguf::TensorType::F16);
  Params h = Params::from_model(*Model::load(path));
  double worst = 0.0;
  for (size_t i = 0; i < p.size(); ++i) worst = std::max(worst, double(std::fabs(p.data()[i] - h.data()[i])));
  CHECK(worst < 2e-3);
  std::remove(path.c_str());
}

// ---- Training -------------------------------------------------------------------------------------

OSD_TEST(lr_schedule) {
  LrSchedule s;
  s.lr = 1.0f;
  s.warmup = 4;
  CHECK_NEAR(s.at(1), 0.25, 1e-7);
  CHECK_NEAR(s.at(4), 1.0, 1e-7);
  CHECK_NEAR(s.at(100), 1.0, 1e-7);
  s.decay = LrDecay::Cosine;
  s.total_steps = 14;
  s.min_lr = 0.1f;
  CHECK_NEAR(s.at(9), 0.55, 1e-6);  // halfway through the decay
  CHECK_NEAR(s.at(14), 0.1, 1e-6);
  CHECK_NEAR(s.at(50), 0.1, 1e-6);
  s.decay = LrDecay::Linear;
  CHECK_NEAR(s.at(9), 0.55, 1e-6);
  CHECK_NEAR(s.at(11), 0.37, 1e-6);
  TrainerConfig bad;
  bad.schedule.decay = LrDecay::Cosine;
  CHECK_THROWS(Error, validate_trainer_config(bad), "totalSteps");
  bad = TrainerConfig();
  bad.clip_norm = -1.0f;
  CHECK_THROWS(Error, validate_trainer_config(bad), "clipNorm");
  CHECK_THROWS(Error, parse_lr_decay("step"), "schedule");
}

OSD_TEST(overfit_fixed_batch) {
  ModelConfig c = tiny_config(true);
  c.dim = 32, c.head_dim = 8, c.ffn_dim = 64;
  const int32_t B = 2, T = 16;
  auto tokens = rand_ids(B * T + 1, c.vocab, 70);
  std::vector<int32_t> in(B * T), tg(B * T);
  for (int32_t i = 0; i < B * T; ++i) in[i] = tokens[i], tg[i] = tokens[i + 1];
  TrainerConfig tc;
  tc.schedule.lr = 1e-2f;
  tc.schedule.warmup = 10;
  tc.schedule.decay = LrDecay::Cosine;
  tc.schedule.total_steps = 200;
  tc.schedule.min_lr = 1e-3f;
  Trainer tr(Params::random(c, 7), tc);
  Batch b;
  b.batch = B;
  b.seq_len = T;
  b.tokens = in.data();
  b.loss.targets = tg.data();
  StepResult first = tr.step(b), last;
  for (int i = 1; i < 200; ++i) last = tr.step(b);
  const double final_loss = tr.eval_loss(b);
  std::printf("    loss %.4f -> %.4f after %lld steps (ln 37 = %.3f)\n", first.loss, final_loss,
              static_cast<long long>(tr.steps()), std::log(37.0));
  CHECK(first.applied && last.applied);
  CHECK(std::fabs(first.loss - std::log(37.0)) < 0.1);
  CHECK(final_loss < 0.05);
}

OSD_TEST(distillation_lowers_kd_loss) {
  // A student learns a different random teacher's distributions on masked positions.
  ModelConfig c = tiny_config(false);
  const int32_t B = 2, T = 12, V = c.vocab;
  Params teacher = spread_params(c, 80, 0.5f);
  auto tokens = rand_ids(B * T, V, 81);
  std::vector<float> tlogits(B * T * V);
  forward_logits(teacher, tokens.data(), B, T, tlogits.data());
  std::vector<uint8_t> mask(B * T);
  for (int32_t i = 0; i < B * T; ++i) mask[i] = i % 3 != 0;
  // The teacher's top-8 (sparse form), as the serving loop records it.
  const int32_t k = 8;
  std::vector<int32_t> ids(B * T * k);
  std::vector<float> probs(B * T * k);
  for (int32_t r = 0; r < B * T; ++r) {
    std::vector<double> pr(V);
    double mx = -INFINITY, s = 0.0;
    for (int32_t j = 0; j < V; ++j) mx = std::max(mx, double(tlogits[r * V + j]));
    for (int32_t j = 0; j < V; ++j) s += (pr[j] = std::exp(tlogits[r * V + j] - mx));
    std::vector<int32_t> order(V);
    for (int32_t j = 0; j < V; ++j) order[j] = j;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) { return pr[a] > pr[b]; });
    for (int32_t i = 0; i < k; ++i) ids[r * k + i] = order[i], probs[r * k + i] = static_cast<float>(pr[order[i]] / s);
  }
  for (bool sparse : {false, true}) {
    TrainerConfig tc;
    tc.schedule.lr = 3e-3f;
    Trainer tr(spread_params(c, 82), tc);
    Batch b;
    b.batch = B;
    b.seq_len = T;
    b.tokens = tokens.data();
    b.loss.distill.kind = DistillKind::ForwardKL;
    b.loss.distill.mask = mask.data();
    if (sparse) {
      b.loss.distill.topk_ids = ids.data();
      b.loss.distill.topk_probs = probs.data();
      b.loss.distill.k = k;
    } else {
      b.loss.distill.teacher = tlogits.data();
    }
    const double before = tr.eval_loss(b);
    for (int i = 0; i < 30; ++i) tr.step(b);
    const double after = tr.eval_loss(b);
    std::printf("    %s forward KL %.4f -> %.4f in 30 steps\n", sparse ? "sparse top-8" : "dense", before, after);
    CHECK(after < 0.5 * before);
  }
}

OSD_TEST(checkpoint_resume_is_identical) {
  ModelConfig c = tiny_config(false);
  const int32_t B = 2, T = 8;
  TrainerConfig tc;
  tc.schedule.lr = 5e-3f;
  tc.schedule.warmup = 2;
  tc.schedule.decay = LrDecay::Cosine;
  tc.schedule.total_steps = 12;
  tc.weight_decay = 0.1f;
  tc.clip_norm = 0.5f;
  Trainer a(Params::random(c, 90), tc);
  std::vector<std::vector<int32_t>> ins, tgs;
  for (int s = 0; s < 8; ++s) ins.push_back(rand_ids(B * T, c.vocab, 100 + s)), tgs.push_back(rand_ids(B * T, c.vocab, 200 + s));
  auto batch = [&](int s) {
    Batch b;
    b.batch = B;
    b.seq_len = T;
    b.tokens = ins[s].data();
    b.loss.targets = tgs[s].data();
    return b;
  };
  for (int s = 0; s < 4; ++s) a.step(batch(s));
  const std::string path = temp_path("ckpt.gguf");
  a.save_checkpoint(path);
  std::vector<StepResult> ra, rb;
  for (int s = 4; s < 8; ++s) ra.push_back(a.step(batch(s)));
  std::unique_ptr<Trainer> b = Trainer::load_checkpoint(path);
  CHECK_EQ(b->steps(), int64_t(4));
  for (int s = 4; s < 8; ++s) rb.push_back(b->step(batch(s)));
  for (int i = 0; i < 4; ++i) {
    CHECK_EQ(ra[i].loss, rb[i].loss);
    CHECK_EQ(ra[i].grad_norm, rb[i].grad_norm);
    CHECK_EQ(ra[i].lr, rb[i].lr);
  }
  CHECK(std::equal(a.params().data(), a.params().data() + a.params().size(), b->params().data()));
  // The checkpoint is also a plain model file.
  std::shared_ptr<Model> m = Model::load(path);
  CHECK_EQ(m->config().n_layers, 2);
  // A truncated checkpoint is an Io error, not a crash.
  {
    FILE* f = std::fopen(path.c_str(), "r+b");
    std::fseek(f, 0, SEEK_END);
    const long size = std::ftell(f);
    std::fclose(f);
    CHECK(truncate(path.c_str(), size / 2) == 0);
    CHECK_THROWS(Error, Trainer::load_checkpoint(path), "osd_test_train");
  }
  // A model file is not a checkpoint.
  a.params().save_gguf(path);
  CHECK_THROWS(Error, Trainer::load_checkpoint(path), "not a training checkpoint");
  std::remove(path.c_str());
}

OSD_TEST(step_guard_and_bad_input) {
  ModelConfig c = tiny_config(true);
  Trainer tr(Params::random(c, 3), TrainerConfig());
  std::vector<int32_t> tokens = rand_ids(8, c.vocab, 4), targets = rand_ids(8, c.vocab, 5);
  Batch b;
  b.batch = 1;
  b.seq_len = 8;
  b.tokens = tokens.data();
  b.loss.targets = targets.data();
  // Clipping: the reported norm is the unclipped one, and the step goes through.
  StepResult r = tr.step(b);
  CHECK(r.applied && r.grad_norm > 0.0 && r.step == 1);
  // Bad ids are RangeErrors naming the argument.
  tokens[3] = c.vocab;
  CHECK_THROWS(Error, tr.step(b), "tokens[3]");
  tokens[3] = 0;
  targets[5] = -2;
  CHECK_THROWS(Error, tr.step(b), "targets[5]");
  targets[5] = 1;
  b.seq_len = c.context + 1;
  CHECK_THROWS(Error, tr.step(b), "seqLen");
  b.seq_len = 8;
  // A diverged model: NaN loss, nothing applied, the step count unchanged.
  tr.params().data()[tr.params().layout().output_norm()] = NAN;
  const std::vector<float> before(tr.params().data(), tr.params().data() + tr.params().size());
  r = tr.step(b);
  CHECK(!r.applied);
  CHECK(std::isnan(r.loss));
  CHECK_EQ(tr.steps(), int64_t(1));
  CHECK(std::memcmp(before.data(), tr.params().data(), before.size() * sizeof(float)) == 0);
}

// ---- Throughput (only with OSD_TRAIN_BENCH=1) -----------------------------------------------------

namespace {

// Peak f32 FMA rate of the pool's threads (10 independent chains of 8-lane FMAs per thread), so the
// training rate can be stated as a ratio measured in the same run on this shared machine.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"), noinline)) float fma_spin(long n, float b, float c) {
  __m256 a[10];
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(1.0f + i);
  const __m256 vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c);
  for (long i = 0; i < n; ++i) {
    a[0] = _mm256_fmadd_ps(a[0], vb, vc), a[1] = _mm256_fmadd_ps(a[1], vb, vc);
    a[2] = _mm256_fmadd_ps(a[2], vb, vc), a[3] = _mm256_fmadd_ps(a[3], vb, vc);
    a[4] = _mm256_fmadd_ps(a[4], vb, vc), a[5] = _mm256_fmadd_ps(a[5], vb, vc);
    a[6] = _mm256_fmadd_ps(a[6], vb, vc), a[7] = _mm256_fmadd_ps(a[7], vb, vc);
    a[8] = _mm256_fmadd_ps(a[8], vb, vc), a[9] = _mm256_fmadd_ps(a[9], vb, vc);
  }
  float t[8], s = 0.0f;
  for (int i = 0; i < 10; ++i) _mm256_storeu_ps(t, a[i]), s += t[0];
  return s;
}

double peak_gflops() {
  const int threads = default_threads();
  const long n = 20000000;
  volatile float b = 0.999999f, c = 1e-7f;
  std::vector<float> sink(threads);
  auto t0 = std::chrono::steady_clock::now();
  default_pool().parallel_for(threads, 1, [&](size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) sink[i] = fma_spin(n, b, c);
  });
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return threads * n * 10.0 * 16.0 / sec / 1e9;
}
#else
double peak_gflops() { return 0.0; }
#endif

}  // namespace

OSD_TEST(bench) {
  if (!std::getenv("OSD_TRAIN_BENCH")) return;
  ModelConfig c;
  c.vocab = 4096, c.dim = 256, c.n_layers = 6, c.n_heads = 8, c.n_kv_heads = 8, c.head_dim = 32, c.ffn_dim = 688;
  c.context = 256;
  const int32_t B = std::getenv("OSD_TRAIN_B") ? std::atoi(std::getenv("OSD_TRAIN_B")) : 8, T = 128;
  Params p = Params::random(c, 1);
  size_t matmul_params = c.vocab * size_t(c.dim);  // LM head
  for (const auto& t : p.layout().tensors())
    if (t.matrix && t.name != "token_embd.weight" && t.name != "output.weight") matmul_params += t.size();
  TrainerConfig tc;
  tc.schedule.lr = 1e-3f;
  Trainer tr(std::move(p), tc);
  auto tokens = rand_ids(B * T, c.vocab, 1), targets = rand_ids(B * T, c.vocab, 2);
  Batch b;
  b.batch = B;
  b.seq_len = T;
  b.tokens = tokens.data();
  b.loss.targets = targets.data();
  tr.step(b);  // warm-up
  const int steps = 5;
  const double peak_before = peak_gflops();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) tr.step(b);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  const double peak = std::max(peak_before, peak_gflops());
  const double tokens_s = B * T / sec;
  const double attn_flops = 6.0 * 2.0 * c.n_layers * double(T) / 2 * c.q_dim();  // per token, causal
  const double gflops = (6.0 * matmul_params + attn_flops) * B * T / sec / 1e9;
  std::printf("    params %.2fM, %d x %d tokens/step, %d threads: %.3f s/step, %.0f tokens/s, %.1f GFLOP/s = %.2f of "
              "the same-run FMA peak (%.0f GFLOP/s)\n",
              tr.params().size() / 1e6, B, T, default_threads(), sec, tokens_s, gflops, gflops / peak, peak);
}

OSD_TEST_MAIN()
