#include "distill/losses.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/thread_pool.h"
#include "spec/sampling.h"  // the blocked scheme: kStatBlock, block_exp_sum

// The SIMD helpers of fast_math.h are always inlined, so no vector crosses a call: GCC's warning
// that returning one from a baseline-compiled function changes the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace osd {

#define OSD_CLONES OSD_SIMD_CLONES

DistillKind parse_distill_kind(const std::string& name, const std::string& what) {
  if (name == "forward-kl") return DistillKind::ForwardKL;
  if (name == "reverse-kl") return DistillKind::ReverseKL;
  if (name == "jsd") return DistillKind::JSD;
  if (name == "tvd") return DistillKind::TVD;
  throw_range(what + " must be one of 'forward-kl', 'reverse-kl', 'jsd', 'tvd', got '" + name + "'");
}

void validate_distill(const DistillInput& in) {
  if (!(in.temperature > 0.0f) || !std::isfinite(in.temperature))
    throw_range("temperature must be a finite number > 0, got " + num_str(in.temperature));
  // 1 / T must be a finite float (a subnormal T made every loss NaN).
  if (in.temperature < std::numeric_limits<float>::min())
    throw_range("temperature must be at least " + num_str(std::numeric_limits<float>::min()) + ", got " +
                num_str(in.temperature));
  if (in.kind == DistillKind::JSD && !(in.beta > 0.0f && in.beta < 1.0f))
    throw_range("beta must be in (0, 1), got " + num_str(in.beta));
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
        throw_range("teacher.probs" + at + " must be a finite probability >= 0, got " + num_str(pr[i]));
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

// Max of a row and whether any entry is not finite (distillation needs finite log-probabilities).
template <class V> OSD_SIMD_INLINE float finite_max_v(const float* x, int32_t n, bool* bad) {
  constexpr int L = kLanes<V>;
  V m0 = splat<V>(-std::numeric_limits<float>::max()), m1 = m0;
  V z0 = {}, z1 = {};  // sums of x - x: 0 while every entry is finite, NaN after an Infinity or NaN
  int32_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    const V x0 = vload<V>(x + j), x1 = vload<V>(x + j + L);
    m0 = vmax(m0, x0);
    m1 = vmax(m1, x1);
    z0 += x0 - x0;
    z1 += x1 - x1;
  }
  m0 = vmax(m0, m1);
  z0 += z1;
  float mm = -std::numeric_limits<float>::max();
  bool b = false;
  for (int k = 0; k < L; ++k) mm = m0[k] > mm ? m0[k] : mm, b |= z0[k] != 0.0f;
  for (; j < n; ++j) mm = x[j] > mm ? x[j] : mm, b |= !(std::fabs(x[j]) <= std::numeric_limits<float>::max());
  *bad = b;
  return mm;
}

OSD_CLONES float finite_max(const float* x, int32_t n, bool* bad) { return OSD_SIMD_WIDTH(finite_max_v, x, n, bad); }

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

// Per-bin loss term and dL/dq for the given log-probabilities of teacher (lp) and student (lq),
// with q = exp(lq) as computed on the way (callers need it for E_q[g]).
struct BinTerm {
  double loss;
  double g;
  double q;
};

// The per-call constants of bin_term, computed once instead of once per bin.
struct BinConsts {
  double beta, log_beta, log1m_beta;
  explicit BinConsts(double b) : beta(b), log_beta(std::log(b)), log1m_beta(std::log1p(-b)) {}
};

BinTerm bin_term(DistillKind kind, double lp, double lq, const BinConsts& c) {
  const double p = std::exp(lp), q = std::exp(lq);
  switch (kind) {
    case DistillKind::ForwardKL:  // g = -p/q; callers use q * g = -p directly
      return {p > 0.0 ? p * (lp - lq) : 0.0, 0.0, q};
    case DistillKind::ReverseKL: {
      const double lpf = std::max(lp, std::log(1e-12));  // a zero teacher bin would make KL(q||p) infinite
      return {q > 0.0 ? q * (lq - lpf) : 0.0, lq - lpf, q};
    }
    case DistillKind::JSD: {
      const double beta = c.beta;
      const double lm = log_add_exp(c.log_beta + lp, c.log1m_beta + lq);
      const double l = (p > 0.0 ? beta * p * (lp - lm) : 0.0) + (q > 0.0 ? (1.0 - beta) * q * (lq - lm) : 0.0);
      return {l, (1.0 - beta) * (lq - lm), q};
    }
    case DistillKind::TVD:
      return {0.5 * std::fabs(p - q), q > p ? 0.5 : (q < p ? -0.5 : 0.0), q};
  }
  return {0.0, 0.0, q};
}

// The k + 1 bins of a sparse teacher row (its k tokens and "the rest"): the teacher's masses, and
// from the student's log-normaliser and log rest mass the loss, g_b = dL/dq_b and E_q[g]. The
// reference and the fast path share it; they differ only in how they sum the student's row.
struct SparseBins {
  const int32_t* ids;
  const float* probs;
  int32_t k;
  double pnorm, lp_rest;
  std::vector<int32_t> order;  // 0..k-1 sorted by id
  double loss = 0.0, eg = 0.0;
  std::vector<double> gb;  // k + 1, the rest last

  SparseBins(const DistillInput& in, int32_t r)
      : ids(in.topk_ids + static_cast<size_t>(r) * in.k), probs(in.topk_probs + static_cast<size_t>(r) * in.k),
        k(in.k), order(in.k), gb(in.k + 1) {
    double psum = 0.0;
    for (int32_t i = 0; i < k; ++i) psum += probs[i];
    // With k = V there is no token outside the top-k, so any residual is rounding (validation allows
    // up to 1e-3): drop it, or an empty student bin would make forward KL infinite.
    const double pres = k == in.vocab ? 0.0 : in.residual ? in.residual[r] : std::max(0.0, 1.0 - psum);
    pnorm = psum + pres;  // renormalise away the tolerated rounding
    lp_rest = pres > 0.0 ? std::log(pres / pnorm) : -INFINITY;
    for (int32_t i = 0; i < k; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  }

  // lq_rest: log of the student's mass outside the top-k (-Infinity when k = V).
  void score(DistillKind kind, const float* s, float ms, float inv_t, double log_zs, double lq_rest,
             const BinConsts& c) {
    for (int32_t i = 0; i < k; ++i) {
      const double lq = (s[ids[i]] - ms) * inv_t - log_zs;
      const double lp = probs[i] > 0.0f ? std::log(probs[i] / pnorm) : -INFINITY;
      const BinTerm b = bin_term(kind, lp, lq, c);
      loss += b.loss;
      gb[i] = b.g;
      eg += b.q * b.g;
    }
    const BinTerm b = bin_term(kind, lp_rest, lq_rest, c);
    loss += b.loss;
    gb[k] = b.g;
    if (lq_rest > -INFINITY) eg += b.q * b.g;
  }

  // The gradient at the k teacher tokens (the caller writes the rest of the row).
  void topk_grad(DistillKind kind, const float* s, float ms, float inv_t, double log_zs, float gscale,
                 float* grad) const {
    for (int32_t i = 0; i < k; ++i) {
      const double q = std::exp((s[ids[i]] - ms) * inv_t - log_zs);
      grad[ids[i]] = gscale * static_cast<float>(kind == DistillKind::ForwardKL ? q - probs[i] / pnorm
                                                                                : q * (gb[i] - eg));
    }
  }
};

}  // namespace

OSD_CLONES double distill_row(const DistillInput& in, int32_t r, float scale, float* grad) {
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
    const BinConsts c(in.beta);
    for (int32_t j = 0; j < V; ++j) {
      const double lq = (s[j] - ms) * inv_t - log_zs, lp = (t[j] - mt) * inv_t - log_zt;
      BinTerm b = bin_term(in.kind, lp, lq, c);
      loss += b.loss;
      eg += b.q * b.g;
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
  SparseBins bins(in, r);
  const int32_t k = in.k;
  // Student mass outside the top-k, summed directly (no 1 - x cancellation) and relative to the
  // largest logit outside the top-k, so it cannot underflow to 0 when the top-k hold almost
  // everything (log q_rest is then very negative, but finite).
  double lq_rest = -INFINITY;
  if (k < V) {
    float rest_max = -std::numeric_limits<float>::infinity();
    {
      int32_t o = 0;
      for (int32_t j = 0; j < V; ++j) {
        if (o < k && bins.ids[bins.order[o]] == j) { ++o; continue; }
        rest_max = std::max(rest_max, s[j]);
      }
    }
    double rest = 0.0;
    int32_t o = 0;
    for (int32_t j = 0; j < V; ++j) {
      if (o < k && bins.ids[bins.order[o]] == j) { ++o; continue; }
      rest += std::exp((s[j] - rest_max) * inv_t);
    }
    lq_rest = static_cast<double>((rest_max - ms) * inv_t) + std::log(rest) - log_zs;
  }
  bins.score(in.kind, s, ms, inv_t, log_zs, lq_rest, BinConsts(in.beta));
  if (!grad) return bins.loss;
  if (in.kind == DistillKind::ForwardKL) {
    // q_j g_b = -p_b for a top-k token; -p_rest q_j / q_rest for the others; E_q[g] = -1.
    for (int32_t j = 0; j < V; ++j) {
      const double lq = (s[j] - ms) * inv_t - log_zs;
      const double qp = bins.lp_rest > -INFINITY ? std::exp(lq - lq_rest + bins.lp_rest) : 0.0;
      grad[j] = gscale * static_cast<float>(std::exp(lq) - qp);
    }
  } else {
    for (int32_t j = 0; j < V; ++j) {
      const double q = std::exp((s[j] - ms) * inv_t - log_zs);
      grad[j] = gscale * static_cast<float>(q * (bins.gb[k] - bins.eg));
    }
  }
  bins.topk_grad(in.kind, s, ms, inv_t, log_zs, gscale, grad);
  return bins.loss;
}

// ---------------------------------------------------------------- forward KL, blocked

namespace {

// The whole 32-entry groups of fkl_teacher_block (kUnitT: temperature 1, no multiply by 1), the
// loop over a group's vectors unrolled so that the sums stay in registers (as in block_exp_sum).
template <class V, bool kUnitT, bool kStore>
OSD_SIMD_INLINE int32_t fkl_teacher_groups(const float* t, const float* s, int32_t n, float bt, float bs, float it,
                                           float* et, Lanes32<V>& a, Lanes32<V>& d) {
  constexpr int L = kLanes<V>;
  const V vbt = splat<V>(bt), vbs = splat<V>(bs), vit = splat<V>(it);
  int32_t j = 0;
  for (; j + kStatLanes <= n; j += kStatLanes) {
    __builtin_prefetch(t + j + kStatBlock);  // the next block, as in block_exp_sum
    __builtin_prefetch(t + j + kStatBlock + 16);
#pragma GCC unroll 4
    for (int v = 0; v < kStatLanes / L; ++v) {
      const V tt = vload<V>(t + j + v * L) - vbt, dd = tt - (vload<V>(s + j + v * L) - vbs);
      const V e = vexp(kUnitT ? tt : tt * vit);
      if (kStore) vstore(et + j + v * L, e);
      a.v[v] += e;
      d.v[v] += e * (kUnitT ? dd : dd * vit);
    }
  }
  return j;
}

template <class V>
OSD_SIMD_INLINE void fkl_teacher_block_v(const float* t, const float* s, int32_t n, float bt, float bs, float it,
                                         float* et, float* st, float* dsum) {
  Lanes32<V> a, d;
  const bool unit = it == 1.0f;
  int32_t j = et ? (unit ? fkl_teacher_groups<V, true, true>(t, s, n, bt, bs, it, et, a, d)
                         : fkl_teacher_groups<V, false, true>(t, s, n, bt, bs, it, et, a, d))
                 : (unit ? fkl_teacher_groups<V, true, false>(t, s, n, bt, bs, it, et, a, d)
                         : fkl_teacher_groups<V, false, false>(t, s, n, bt, bs, it, et, a, d));
  float la[kStatLanes], ld[kStatLanes];
  a.spill(la);
  d.spill(ld);
  for (; j < n; ++j) {
    const float tt = t[j] - bt, e = exp_approx(tt * it);
    if (et) et[j] = e;
    la[j % kStatLanes] += e;
    ld[j % kStatLanes] += e * ((tt - (s[j] - bs)) * it);
  }
  *st = fold_lanes32(la);
  *dsum = fold_lanes32(ld);
}

// One teacher block of forward KL: et_j = exp_approx((t_j - bt) * it), stored in et when not null;
// *st = lane_sum(et) and *dsum = lane_sum(et_j * d_j), d_j = ((t_j - bt) - (s_j - bs)) * it.
OSD_CLONES void fkl_teacher_block(const float* t, const float* s, int32_t n, float bt, float bs, float it, float* et,
                                  float* st, float* dsum) {
  OSD_SIMD_WIDTH(fkl_teacher_block_v, t, s, n, bt, bs, it, et, st, dsum);
}

// grad_j = gscale * (q_j - p_j) with q_j = es_j * qs (es_j read from grad) and p_j = et_j * qt.
template <class V>
OSD_SIMD_INLINE void fkl_grad_block_v(float* grad, const float* et, int32_t n, float qs, float qt, float gscale) {
  constexpr int L = kLanes<V>;
  const V vqs = splat<V>(qs), vqt = splat<V>(qt), vg = splat<V>(gscale);
  int32_t j = 0;
  for (; j + L <= n; j += L) vstore(grad + j, vg * (vload<V>(grad + j) * vqs - vload<V>(et + j) * vqt));
  for (; j < n; ++j) grad[j] = gscale * (grad[j] * qs - et[j] * qt);
}

OSD_CLONES void fkl_grad_block(float* grad, const float* et, int32_t n, float qs, float qt, float gscale) {
  OSD_SIMD_WIDTH(fkl_grad_block_v, grad, et, n, qs, qt, gscale);
}

// fkl_grad_block's values, with es_j read from es, and grad written past the caches (stream_block):
// a gradient larger than the caches then costs one write of each line instead of a read for
// ownership and a write-back. The caller fences (stream_fence) before it publishes.
template <class V>
OSD_SIMD_INLINE void fkl_grad_block_stream_v(float* grad, const float* es, const float* et, int32_t n, float qs,
                                             float qt, float gscale) {
  const V vqs = splat<V>(qs), vqt = splat<V>(qt), vg = splat<V>(gscale);
  stream_block<V>(
      grad, n, [&](int32_t j) { return vg * (vload<V>(es + j) * vqs - vload<V>(et + j) * vqt); },
      [&](int32_t j) { return gscale * (es[j] * qs - et[j] * qt); });
}

OSD_CLONES void fkl_grad_block_stream(float* grad, const float* es, const float* et, int32_t n, float qs, float qt,
                                      float gscale) {
  OSD_SIMD_WIDTH(fkl_grad_block_stream_v, grad, es, et, n, qs, qt, gscale);
}

// Pass 1's per-block statistics of a student / teacher row pair, shared by the blocked losses:
// block maxima, exp sums, and after combine() the rescales c_b to the row maxima.
struct PairBlocks {
  std::vector<float> ms, mt, ss, st, cs, ct;
  std::vector<uint8_t> bad;  // 1: student block not finite, 2: teacher block

  void resize(int32_t nb) {
    for (auto* v : {&ms, &mt, &ss, &st, &cs, &ct}) v->resize(nb);
    bad.resize(nb);
  }
  // Block b's maxima; false when either block holds a non-finite logit (then it has no sums).
  bool maxima(size_t b, const float* s, const float* t, int32_t n) {
    bool bs, bt;
    ms[b] = finite_max(s, n, &bs);
    mt[b] = finite_max(t, n, &bt);
    bad[b] = (bs ? 1 : 0) | (bt ? 2 : 0);
    return bad[b] == 0;
  }
  // The row maxima, c_b = exp_approx((bm_b - max) it) and both normalisers, in block order; a bad
  // row throws (the student's first).
  void combine(int32_t nb, float it, int32_t r, float& ms_row, float& mt_row, double& zs, double& zt) {
    float m_s = -std::numeric_limits<float>::max(), m_t = m_s;
    int b_any = 0;
    for (int32_t b = 0; b < nb; ++b) m_s = std::max(m_s, ms[b]), m_t = std::max(m_t, mt[b]), b_any |= bad[b];
    if (b_any & 1) throw_range("studentLogits row " + std::to_string(r) + " contains NaN or Infinity");
    if (b_any & 2) throw_range("teacherLogits row " + std::to_string(r) + " contains NaN or Infinity");
    zs = 0.0, zt = 0.0;
    for (int32_t b = 0; b < nb; ++b) {
      cs[b] = exp_approx((ms[b] - m_s) * it);
      ct[b] = exp_approx((mt[b] - m_t) * it);
      zs += static_cast<double>(ss[b] * cs[b]);
      zt += static_cast<double>(st[b] * ct[b]);
    }
    ms_row = m_s, mt_row = m_t;
  }
};

struct FklScratch {
  PairBlocks p;
  std::vector<float> es, et, ds;  // es: the student's exp terms when the gradient is streamed
};

}  // namespace

double forward_kl_row_blocked(const DistillInput& in, int32_t r, float scale, float* grad, bool stream) {
  const int32_t V = in.vocab, nb = stat_blocks(V);
  const float* s = in.student + static_cast<size_t>(r) * V;
  const float* t = in.teacher + static_cast<size_t>(r) * V;
  const float it = 1.0f / in.temperature;
  // This thread's scratch, reached by reference from the pool workers that run its blocks.
  thread_local FklScratch tl;
  FklScratch& w = tl;
  if (grad) w.et.resize(V);
  float* et = grad ? w.et.data() : nullptr;
  stream = stream && grad;
  if (stream) w.es.resize(V);
  float* es = stream ? w.es.data() : grad;  // where pass 1 keeps the student's exp terms
  PairBlocks& pb = w.p;
  pb.resize(nb);
  w.ds.resize(nb);
  // Pass 1, one read of each block: maxima, exp terms (the student's into grad, or into scratch
  // when the gradient is streamed), their sums. One
  // run of consecutive blocks per thread: a block prefetches the next one while its exps run, so
  // only a run's first block waits on memory.
  const size_t grain = default_pool().grain_per_thread(nb);
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, n = std::min(kStatBlock, V - j0);
      if (!pb.maxima(b, s + j0, t + j0, n)) continue;
      pb.ss[b] = block_exp_sum(s + j0, n, pb.ms[b], it, es ? es + j0 : nullptr);
      fkl_teacher_block(t + j0, s + j0, n, pb.mt[b], pb.ms[b], it, et ? et + j0 : nullptr, &pb.st[b], &w.ds[b]);
    }
  });
  // Combine in block order. c_b rescales block b to the row max.
  // KL = sum_j p_j ((t_j - mt) - (s_j - ms)) it + log zs - log zt (the p_j sum to 1), where
  // ((t_j - mt) - (s_j - ms)) it = d_j + k_b with k_b = ((bt_b - mt) - (bs_b - ms)) it, and
  // p_j = et_j ct_b / zt: block b adds ct_b (D_b + St_b k_b) / zt.
  float ms, mt;
  double zs, zt;
  pb.combine(nb, it, r, ms, mt, zs, zt);
  double cross = 0.0;
  for (int32_t b = 0; b < nb; ++b) {
    const double k = ((static_cast<double>(pb.mt[b]) - mt) - (static_cast<double>(pb.ms[b]) - ms)) * it;
    cross += static_cast<double>(pb.ct[b]) * (w.ds[b] + pb.st[b] * k);
  }
  const double loss = cross / zt + std::log(zs) - std::log(zt);
  if (!grad) return loss;
  // Pass 2, no exp: grad = gscale (q - p) from the kept terms, split as pass 1 (a thread then
  // mostly finds its own blocks in its cache).
  const float gscale = scale * it;
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, n = std::min(kStatBlock, V - j0);
      const float qs = static_cast<float>(pb.cs[b] / zs), qt = static_cast<float>(pb.ct[b] / zt);
      if (stream)
        fkl_grad_block_stream(grad + j0, es + j0, et + j0, n, qs, qt, gscale);
      else
        fkl_grad_block(grad + j0, et + j0, n, qs, qt, gscale);
    }
    if (stream) stream_fence();
  });
  return loss;
}


// ---------------------------------------------------------------- reverse KL, JSD, TVD, blocked

namespace {

// The per-row constants of div_lanes, and a block's scales fq = float(cs_b / zs), fp = float(ct_b / zt).
struct DivRow {
  float ms, mt, it, ls, lt, c, floor, beta;  // ls, lt: float(log z); c = float(log zs - log zt)
};

// One vector of entries: g_j = dL/dq_j and the loss terms, from the logits and the blocks' exp terms.
template <class V, DistillKind kKind>
OSD_SIMD_INLINE void div_lanes(const V& s, const V& t, const V& es, const V& et, const DivRow& r, float fq, float fp,
                               V& g, V& l) {
  const V a = (s - splat<V>(r.ms)) * splat<V>(r.it), b = (t - splat<V>(r.mt)) * splat<V>(r.it);
  const V q = es * splat<V>(fq), p = et * splat<V>(fp);
  const V d = (a - b) - splat<V>(r.c);  // log q - log p, without the cancellation of two logs
  if (kKind == DistillKind::ReverseKL) {
    // A teacher log-probability below log(1e-12) counts as log(1e-12), as in bin_term.
    g = b - splat<V>(r.lt) >= splat<V>(r.floor) ? d : (a - splat<V>(r.ls)) - splat<V>(r.floor);
    l = q * g;
  } else if (kKind == DistillKind::TVD) {
    g = d > V{} ? splat<V>(0.5f) : d < V{} ? splat<V>(-0.5f) : V{};
    const V pq = p - q;
    l = splat<V>(0.5f) * (pq > V{} ? pq : -pq);
  } else {
    // log m = log(beta p + (1 - beta) q) relative to the larger side, e = exp(-|d|) in (0, 1]:
    // when d >= 0, A = log q - log m = -log(beta e + 1 - beta) and B = log p - log m = A - d;
    // otherwise B = -log(beta + (1 - beta) e) and A = B + d. The log's argument stays in
    // [min(beta, 1 - beta), 1]; the side that adds d is the one whose mass is smaller by e^-|d|, so
    // its rounding (ulp(d) for logits of 1e4) is multiplied away.
    const V beta = splat<V>(r.beta), beta1 = splat<V>(1.0f - r.beta);
    const ivec<V> pos = d >= V{};
    const V e = vexp(pos ? -d : d);
    const V lg = -vlog(pos ? beta * e + beta1 : beta + beta1 * e);
    const V A = pos ? lg : lg + d, B = pos ? lg - d : lg;
    g = beta1 * A;
    l = beta * p * B + beta1 * q * A;
  }
}

// One 32-entry group: g_j into g_out, the loss terms and q_j g_j added to their lanes.
template <class V, DistillKind kKind>
OSD_SIMD_INLINE void div_group(const float* s, const float* t, const float* es, const float* et, float* g_out,
                               const DivRow& r, float fq, float fp, Lanes32<V>& ls, Lanes32<V>& es_g) {
  constexpr int L = kLanes<V>;
  V g, l;
#pragma GCC unroll 4
  for (int v = 0; v < kStatLanes / L; ++v) {
    const int32_t i = v * L;
    div_lanes<V, kKind>(vload<V>(s + i), vload<V>(t + i), vload<V>(es + i), vload<V>(et + i), r, fq, fp, g, l);
    vstore(g_out + i, g);
    ls.v[v] += l;
    es_g.v[v] += vload<V>(es + i) * splat<V>(fq) * g;
  }
}

// The loss terms and q_j g_j summed in 32 lanes (entry j in lane j % 32) and folded as lane_sum,
// so both vector widths give the same sums.
template <class V, DistillKind kKind>
OSD_SIMD_INLINE void div_groups(const float* s, const float* t, const float* es, float* et_g, int32_t n,
                                const DivRow& r, float fq, float fp, double* loss, double* eg) {
  Lanes32<V> ls, es_g;
  int32_t j = 0;
  for (; j + kStatLanes <= n; j += kStatLanes)
    div_group<V, kKind>(s + j, t + j, es + j, et_g + j, et_g + j, r, fq, fp, ls, es_g);
  if (j < n) {
    // The last entries padded to a whole group with terms that add nothing: q = p = 0.
    float ps[kStatLanes], pt[kStatLanes], pes[kStatLanes] = {}, pet[kStatLanes] = {}, pg[kStatLanes];
    const int32_t m = n - j;
    for (int32_t k = 0; k < kStatLanes; ++k) {
      ps[k] = k < m ? s[j + k] : r.ms;
      pt[k] = k < m ? t[j + k] : r.mt;
      if (k < m) pes[k] = es[j + k], pet[k] = et_g[j + k];
    }
    div_group<V, kKind>(ps, pt, pes, pet, pg, r, fq, fp, ls, es_g);
    for (int32_t k = 0; k < m; ++k) et_g[j + k] = pg[k];
  }
  float la[kStatLanes], ea[kStatLanes];
  ls.spill(la);
  es_g.spill(ea);
  *loss = fold_lanes32(la);
  *eg = fold_lanes32(ea);
}

template <class V>
OSD_SIMD_INLINE void div_block_v(DistillKind kind, const float* s, const float* t, const float* es, float* et_g,
                                 int32_t n, const DivRow& r, float fq, float fp, double* loss, double* eg) {
  if (kind == DistillKind::ReverseKL)
    div_groups<V, DistillKind::ReverseKL>(s, t, es, et_g, n, r, fq, fp, loss, eg);
  else if (kind == DistillKind::TVD)
    div_groups<V, DistillKind::TVD>(s, t, es, et_g, n, r, fq, fp, loss, eg);
  else
    div_groups<V, DistillKind::JSD>(s, t, es, et_g, n, r, fq, fp, loss, eg);
}

// Pass 2 of divergence_row_blocked on one block: g_j over et (in place), and the block's sums of
// the loss terms and of q_j g_j.
OSD_CLONES void div_block(DistillKind kind, const float* s, const float* t, const float* es, float* et_g, int32_t n,
                          const DivRow& r, float fq, float fp, double* loss, double* eg) {
  OSD_SIMD_WIDTH(div_block_v, kind, s, t, es, et_g, n, r, fq, fp, loss, eg);
}

// grad_j = c es_j (g_j - eg), c = gscale float(cs_b / zs) (grad and es may be the same array).
OSD_CLONES void div_grad_block(float* grad, const float* es, const float* g, int32_t n, float c, float eg) {
  for (int32_t j = 0; j < n; ++j) grad[j] = c * es[j] * (g[j] - eg);
}

// div_grad_block's values, grad written past the caches (as fkl_grad_block_stream; es apart from grad).
template <class V>
OSD_SIMD_INLINE void div_grad_block_stream_v(float* grad, const float* es, const float* g, int32_t n, float c,
                                             float eg) {
  const V vc = splat<V>(c), veg = splat<V>(eg);
  stream_block<V>(
      grad, n, [&](int32_t j) { return vc * vload<V>(es + j) * (vload<V>(g + j) - veg); },
      [&](int32_t j) { return c * es[j] * (g[j] - eg); });
}

OSD_CLONES void div_grad_block_stream(float* grad, const float* es, const float* g, int32_t n, float c, float eg) {
  OSD_SIMD_WIDTH(div_grad_block_stream_v, grad, es, g, n, c, eg);
}

struct DivScratch {
  PairBlocks p;
  std::vector<float> es, et;
  std::vector<double> loss, eg;
};

}  // namespace

double divergence_row_blocked(const DistillInput& in, int32_t r, float scale, float* grad, bool stream) {
  const int32_t V = in.vocab, nb = stat_blocks(V);
  const float* s = in.student + static_cast<size_t>(r) * V;
  const float* t = in.teacher + static_cast<size_t>(r) * V;
  const float it = 1.0f / in.temperature;
  thread_local DivScratch tl;
  DivScratch& w = tl;
  stream = stream && grad;
  if (!grad || stream) w.es.resize(V);
  w.et.resize(V);
  float* es = grad && !stream ? grad : w.es.data();
  float* et = w.et.data();
  PairBlocks& pb = w.p;
  pb.resize(nb);
  w.loss.resize(nb), w.eg.resize(nb);
  const size_t grain = default_pool().grain_per_thread(nb);
  // Pass 1, as forward_kl_row_blocked's: block maxima, exp terms and their sums.
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, n = std::min(kStatBlock, V - j0);
      if (!pb.maxima(b, s + j0, t + j0, n)) continue;
      pb.ss[b] = block_exp_sum(s + j0, n, pb.ms[b], it, es + j0);
      pb.st[b] = block_exp_sum(t + j0, n, pb.mt[b], it, et + j0);
    }
  });
  float ms, mt;
  double zs, zt;
  pb.combine(nb, it, r, ms, mt, zs, zt);
  const double log_zs = std::log(zs), log_zt = std::log(zt);
  const DivRow row{ms,
                   mt,
                   it,
                   static_cast<float>(log_zs),
                   static_cast<float>(log_zt),
                   static_cast<float>(log_zs - log_zt),
                   static_cast<float>(std::log(1e-12)),
                   in.beta};
  // Pass 2: g_j (kept in place of the teacher's exp terms), the loss and E_q[g], block by block.
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, n = std::min(kStatBlock, V - j0);
      div_block(in.kind, s + j0, t + j0, es + j0, et + j0, n, row, static_cast<float>(pb.cs[b] / zs),
                static_cast<float>(pb.ct[b] / zt), &w.loss[b], &w.eg[b]);
    }
  });
  double loss = 0.0, eg = 0.0;
  for (int32_t b = 0; b < nb; ++b) loss += w.loss[b], eg += w.eg[b];
  if (!grad) return loss;
  // Pass 3, no exp: d/ds_j = q_j (g_j - E_q[g]) / T.
  const float gscale = scale * it;
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, n = std::min(kStatBlock, V - j0);
      const float c = gscale * static_cast<float>(pb.cs[b] / zs);
      if (stream)
        div_grad_block_stream(grad + j0, es + j0, et + j0, n, c, static_cast<float>(eg));
      else
        div_grad_block(grad + j0, es + j0, et + j0, n, c, static_cast<float>(eg));
    }
    if (stream) stream_fence();
  });
  return loss;
}

// ---------------------------------------------------------------- sparse teacher, fast

namespace {

template <class V> OSD_SIMD_INLINE float sum_floats_v(const float* x, int32_t n) {
  constexpr int L = kLanes<V>;
  Lanes32<V> a;
  int32_t j = 0;
  for (; j + kStatLanes <= n; j += kStatLanes)
#pragma GCC unroll 4
    for (int v = 0; v < kStatLanes / L; ++v) a.v[v] += vload<V>(x + j + v * L);
  float la[kStatLanes];
  a.spill(la);
  for (; j < n; ++j) la[j % kStatLanes] += x[j];
  return fold_lanes32(la);
}

OSD_CLONES float sum_floats(const float* x, int32_t n) { return OSD_SIMD_WIDTH(sum_floats_v, x, n); }

OSD_CLONES void scale_floats(float* x, int32_t n, float c) {
  for (int32_t j = 0; j < n; ++j) x[j] *= c;
}

}  // namespace

double sparse_row_fast(const DistillInput& in, int32_t r, float scale, float* grad) {
  const int32_t V = in.vocab, nb = stat_blocks(V), k = in.k;
  const float* s = in.student + static_cast<size_t>(r) * V;
  const float inv_t = 1.0f / in.temperature;
  bool bad = false;
  const float ms = finite_max(s, V, &bad);
  if (bad) throw_range("studentLogits row " + std::to_string(r) + " contains NaN or Infinity");
  // e_j = exp((s_j - ms) / T), kept in grad (or scratch), summed block by block.
  thread_local std::vector<float> tl_e, tl_kept;
  if (!grad) tl_e.resize(V);
  float* e = grad ? grad : tl_e.data();
  double zs = 0.0;
  for (int32_t b = 0; b < nb; ++b) {
    const int32_t j0 = b * kStatBlock;
    zs += block_exp_sum(s + j0, std::min(kStatBlock, V - j0), ms, inv_t, e + j0);
  }
  const double log_zs = std::log(zs);
  SparseBins bins(in, r);
  double lq_rest = -INFINITY;
  if (k < V) {
    // The rest summed directly (no zs - top-k cancellation): the top-k terms set aside meanwhile.
    tl_kept.resize(k);
    for (int32_t i = 0; i < k; ++i) tl_kept[i] = e[bins.ids[i]], e[bins.ids[i]] = 0.0f;
    double rest = 0.0;
    for (int32_t b = 0; b < nb; ++b) {
      const int32_t j0 = b * kStatBlock;
      rest += sum_floats(e + j0, std::min(kStatBlock, V - j0));
    }
    for (int32_t i = 0; i < k; ++i) e[bins.ids[i]] = tl_kept[i];
    // Terms below float's range were flushed to 0: when they could matter (the top-k hold nearly
    // all the mass, e.g. logits of +-1e4), the reference sums the rest relative to its own max.
    if (!(rest >= 1e-25)) return distill_row(in, r, scale, grad);
    lq_rest = std::log(rest) - log_zs;
  }
  bins.score(in.kind, s, ms, inv_t, log_zs, lq_rest, BinConsts(in.beta));
  if (!grad) return bins.loss;
  // Outside the top-k, q_j times one constant: 1 - p_rest / q_rest for forward KL (see distill_row),
  // g_rest - E_q[g] for the others.
  const double c = in.kind == DistillKind::ForwardKL
                       ? (bins.lp_rest > -INFINITY ? 1.0 - std::exp(bins.lp_rest - lq_rest) : 1.0)
                       : bins.gb[k] - bins.eg;
  const float gscale = scale * inv_t;
  scale_floats(grad, V, static_cast<float>(gscale * c / zs));
  bins.topk_grad(in.kind, s, ms, inv_t, log_zs, gscale, grad);
  return bins.loss;
}

double distill_row_fast(const DistillInput& in, int32_t r, float scale, float* grad, bool stream) {
  if (!in.teacher) return sparse_row_fast(in, r, scale, grad);
  return in.kind == DistillKind::ForwardKL ? forward_kl_row_blocked(in, r, scale, grad, stream)
                                           : divergence_row_blocked(in, r, scale, grad, stream);
}

}  // namespace osd
