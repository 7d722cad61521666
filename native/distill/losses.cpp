#include "distill/losses.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/fast_math.h"

namespace osd {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OSD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OSD_CLONES
#endif

DistillKind parse_distill_kind(const std::string& name, const std::string& what) {
  if (name == "forward-kl") return DistillKind::ForwardKL;
  if (name == "reverse-kl") return DistillKind::ReverseKL;
  if (name == "jsd") return DistillKind::JSD;
  if (name == "tvd") return DistillKind::TVD;
  throw_range(what + " must be one of 'forward-kl', 'reverse-kl', 'jsd', 'tvd', got '" + name + "'");
}

void validate_distill(const DistillInput& in) {
  if (!(in.temperature > 0.0f) || !std::isfinite(in.temperature))
    throw_range("temperature must be a finite number > 0, got " + std::to_string(in.temperature));
  if (in.kind == DistillKind::JSD && !(in.beta > 0.0f && in.beta < 1.0f))
    throw_range("beta must be in (0, 1), got " + std::to_string(in.beta));
  if (in.teacher) return;
  std::vector<int32_t> ids;
  for (int32_t r = 0; r < in.rows; ++r) {
    if (in.mask && !in.mask[r]) continue;
    const int32_t* id = in.topk_ids + static_cast<size_t>(r) * in.k;
    const float* pr = in.topk_probs + static_cast<size_t>(r) * in.k;
    double sum = 0.0;
    for (int32_t i = 0; i < in.k; ++i) {
      const std::string at = "[" + std::to_string(static_cast<size_t>(r) * in.k + i) + "]";
      if (id[i] < 0 || id[i] >= in.vocab)
        throw_range("teacher.indices" + at + " = " + std::to_string(id[i]) + " is out of range for vocabSize " +
                    std::to_string(in.vocab));
      if (!std::isfinite(pr[i]) || pr[i] < 0.0f)
        throw_range("teacher.probs" + at + " must be a finite probability >= 0, got " + std::to_string(pr[i]));
      sum += pr[i];
    }
    ids.assign(id, id + in.k);
    std::sort(ids.begin(), ids.end());
    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end())
      throw_range("teacher.indices row " + std::to_string(r) + " repeats a token id");
    double res = in.residual ? in.residual[r] : std::max(0.0, 1.0 - sum);
    if (!std::isfinite(res) || res < 0.0)
      throw_range("teacher.residual[" + std::to_string(r) + "] must be a finite mass >= 0");
    if (std::fabs(sum + res - 1.0) > 1e-3)
      throw_range("teacher row " + std::to_string(r) + ": probabilities plus residual sum to " +
                  std::to_string(sum + res) + ", expected 1");
    if (in.k == in.vocab && res > 1e-3)
      throw_range("teacher row " + std::to_string(r) + " covers the whole vocabulary but has residual mass");
  }
}

namespace {

// Max of a row; throws if any entry is not finite (distillation needs finite log-probabilities).
OSD_CLONES float finite_max(const float* x, int32_t n, bool* bad) {
  constexpr int L = 16;
  float m[L];
  int b[L] = {};
  for (int k = 0; k < L; ++k) m[k] = -std::numeric_limits<float>::max();
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) {
      float v = x[j + k];
      m[k] = v > m[k] ? v : m[k];
      b[k] |= !(std::fabs(v) <= std::numeric_limits<float>::max());
    }
  float mm = -std::numeric_limits<float>::max();
  int bb = 0;
  for (; j < n; ++j) mm = x[j] > mm ? x[j] : mm, bb |= !(std::fabs(x[j]) <= std::numeric_limits<float>::max());
  for (int k = 0; k < L; ++k) mm = m[k] > mm ? m[k] : mm, bb |= b[k];
  *bad = bb != 0;
  return mm;
}

OSD_CLONES double sum_exp_scaled(const float* x, int32_t n, float max, float inv_t) {
  constexpr int L = 16;
  float acc[L] = {};
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) acc[k] += exp_approx((x[j + k] - max) * inv_t);
  double t = 0.0;
  for (; j < n; ++j) t += exp_approx((x[j] - max) * inv_t);
  for (int k = 0; k < L; ++k) t += acc[k];
  return t;
}

// Forward KL against a dense teacher: the hot path of online distillation, one write pass.
OSD_CLONES double forward_kl_dense(const float* s, const float* t, int32_t n, float ms, float mt, float inv_t,
                                   float log_zs, float log_zt, float gscale, float* grad) {
  constexpr int L = 16;
  float acc[L] = {};
  int32_t j = 0;
  // Subtract the row max before scaling: s - ms is exact, while s * inv_t + (-ms * inv_t - log_z)
  // loses |ms| * 2^-24 to cancellation (about 5e-4 for logits near 1e4).
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) {
      float lq = (s[j + k] - ms) * inv_t - log_zs, lp = (t[j + k] - mt) * inv_t - log_zt;
      float p = exp_approx(lp), q = exp_approx(lq);
      acc[k] += p * (lp - lq);
      if (grad) grad[j + k] = gscale * (q - p);
    }
  double loss = 0.0;
  for (; j < n; ++j) {
    float lq = (s[j] - ms) * inv_t - log_zs, lp = (t[j] - mt) * inv_t - log_zt;
    float p = exp_approx(lp), q = exp_approx(lq);
    loss += p * (lp - lq);
    if (grad) grad[j] = gscale * (q - p);
  }
  for (int k = 0; k < L; ++k) loss += acc[k];
  return loss;
}

double log_add_exp(double a, double b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  double m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Per-bin loss term and dL/dq for the given log-probabilities of teacher (lp) and student (lq).
struct BinTerm {
  double loss;
  double g;
};

BinTerm bin_term(DistillKind kind, double lp, double lq, double beta) {
  const double p = std::exp(lp), q = std::exp(lq);
  switch (kind) {
    case DistillKind::ForwardKL:  // g = -p/q; callers use q * g = -p directly
      return {p > 0.0 ? p * (lp - lq) : 0.0, 0.0};
    case DistillKind::ReverseKL: {
      const double lpf = std::max(lp, std::log(1e-12));  // a zero teacher bin would make KL(q||p) infinite
      return {q > 0.0 ? q * (lq - lpf) : 0.0, lq - lpf};
    }
    case DistillKind::JSD: {
      const double lm = log_add_exp(std::log(beta) + lp, std::log1p(-beta) + lq);
      const double l = (p > 0.0 ? beta * p * (lp - lm) : 0.0) + (q > 0.0 ? (1.0 - beta) * q * (lq - lm) : 0.0);
      return {l, (1.0 - beta) * (lq - lm)};
    }
    case DistillKind::TVD:
      return {0.5 * std::fabs(p - q), q > p ? 0.5 : (q < p ? -0.5 : 0.0)};
  }
  return {0.0, 0.0};
}

}  // namespace

double distill_row(const DistillInput& in, int32_t r, float scale, float* grad) {
  const int32_t V = in.vocab;
  const float* s = in.student + static_cast<size_t>(r) * V;
  const float inv_t = 1.0f / in.temperature;
  bool bad = false;
  const float ms = finite_max(s, V, &bad);
  if (bad) throw_range("studentLogits row " + std::to_string(r) + " contains NaN or Infinity");
  const double zs = sum_exp_scaled(s, V, ms, inv_t);
  const double log_zs = std::log(zs);
  const float gscale = scale * inv_t;

  if (in.teacher) {
    const float* t = in.teacher + static_cast<size_t>(r) * V;
    const float mt = finite_max(t, V, &bad);
    if (bad) throw_range("teacherLogits row " + std::to_string(r) + " contains NaN or Infinity");
    const double log_zt = std::log(sum_exp_scaled(t, V, mt, inv_t));
    if (in.kind == DistillKind::ForwardKL)
      return forward_kl_dense(s, t, V, ms, mt, inv_t, static_cast<float>(log_zs), static_cast<float>(log_zt), gscale,
                              grad);
    // Other losses: g_j per token, then d/ds_j = q_j (g_j - E_q[g]) / T.
    double loss = 0.0, eg = 0.0;
    std::vector<float> g(grad ? V : 0);
    for (int32_t j = 0; j < V; ++j) {
      const double lq = (s[j] - ms) * inv_t - log_zs, lp = (t[j] - mt) * inv_t - log_zt;
      BinTerm b = bin_term(in.kind, lp, lq, in.beta);
      loss += b.loss;
      eg += std::exp(lq) * b.g;
      if (grad) g[j] = static_cast<float>(b.g);
    }
    if (grad)
      for (int32_t j = 0; j < V; ++j) {
        const float q = exp_approx((s[j] - ms) * inv_t - static_cast<float>(log_zs));
        grad[j] = gscale * q * (g[j] - static_cast<float>(eg));
      }
    return loss;
  }

  // Sparse teacher: k token bins plus the rest.
  const int32_t k = in.k;
  const int32_t* ids = in.topk_ids + static_cast<size_t>(r) * k;
  const float* probs = in.topk_probs + static_cast<size_t>(r) * k;
  double psum = 0.0;
  for (int32_t i = 0; i < k; ++i) psum += probs[i];
  // With k = V there is no token outside the top-k, so any residual is rounding (validation allows
  // up to 1e-3): drop it, or an empty student bin would make forward KL infinite.
  const double pres = k == V ? 0.0 : in.residual ? in.residual[r] : std::max(0.0, 1.0 - psum);
  const double pnorm = psum + pres;  // renormalise away the tolerated rounding
  std::vector<int32_t> order(k);
  for (int32_t i = 0; i < k; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  // Student mass outside the top-k, summed directly (no 1 - x cancellation) and relative to the
  // largest logit outside the top-k, so it cannot underflow to 0 when the top-k hold almost
  // everything (log q_rest is then very negative, but finite).
  double lq_rest = -INFINITY;
  if (k < V) {
    float rest_max = -std::numeric_limits<float>::infinity();
    {
      int32_t o = 0;
      for (int32_t j = 0; j < V; ++j) {
        if (o < k && ids[order[o]] == j) { ++o; continue; }
        rest_max = std::max(rest_max, s[j]);
      }
    }
    double rest = 0.0;
    int32_t o = 0;
    for (int32_t j = 0; j < V; ++j) {
      if (o < k && ids[order[o]] == j) { ++o; continue; }
      rest += std::exp((s[j] - rest_max) * inv_t);
    }
    lq_rest = static_cast<double>((rest_max - ms) * inv_t) + std::log(rest) - log_zs;
  }
  const double lp_rest = pres > 0.0 ? std::log(pres / pnorm) : -INFINITY;
  double loss = 0.0, eg = 0.0;
  std::vector<double> gb(k + 1);
  for (int32_t i = 0; i < k; ++i) {
    const double lq = (s[ids[i]] - ms) * inv_t - log_zs;
    const double lp = probs[i] > 0.0f ? std::log(probs[i] / pnorm) : -INFINITY;
    BinTerm b = bin_term(in.kind, lp, lq, in.beta);
    loss += b.loss;
    gb[i] = b.g;
    eg += std::exp(lq) * b.g;
  }
  {
    BinTerm b = bin_term(in.kind, lp_rest, lq_rest, in.beta);
    loss += b.loss;
    gb[k] = b.g;
    if (lq_rest > -INFINITY) eg += std::exp(lq_rest) * b.g;
  }
  if (!grad) return loss;
  if (in.kind == DistillKind::ForwardKL) {
    // q_j g_b = -p_b for a top-k token; -p_rest q_j / q_rest for the others; E_q[g] = -1.
    for (int32_t j = 0; j < V; ++j) {
      const double lq = (s[j] - ms) * inv_t - log_zs;
      const double qp = lp_rest > -INFINITY ? std::exp(lq - lq_rest + lp_rest) : 0.0;
      grad[j] = gscale * static_cast<float>(std::exp(lq) - qp);
    }
    for (int32_t i = 0; i < k; ++i) {
      const double lq = (s[ids[i]] - ms) * inv_t - log_zs;
      grad[ids[i]] = gscale * static_cast<float>(std::exp(lq) - probs[i] / pnorm);
    }
    return loss;
  }
  for (int32_t j = 0; j < V; ++j) {
    const double q = std::exp((s[j] - ms) * inv_t - log_zs);
    grad[j] = gscale * static_cast<float>(q * (gb[k] - eg));
  }
  for (int32_t i = 0; i < k; ++i) {
    const double q = std::exp((s[ids[i]] - ms) * inv_t - log_zs);
    grad[ids[i]] = gscale * static_cast<float>(q * (gb[i] - eg));
  }
  return loss;
}

}  // namespace osd
