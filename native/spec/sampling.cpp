#include "spec/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>

#include "core/error.h"
#include "core/fast_math.h"

namespace osd {

// Hot loops are compiled for the baseline and for x86-64-v3 (AVX2 + FMA); the loader picks one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OSD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OSD_CLONES
#endif

void validate_sampling(const Sampling& s, const std::string& what) {
  if (!std::isfinite(s.temperature) || s.temperature < 0.0f)
    throw_range(what + ".temperature must be a finite number >= 0, got " + std::to_string(s.temperature));
  if (s.top_k < 0) throw_range(what + ".topK must be an integer >= 0, got " + std::to_string(s.top_k));
  if (!(s.top_p > 0.0f && s.top_p <= 1.0f))
    throw_range(what + ".topP must be in (0, 1], got " + std::to_string(s.top_p));
}

namespace {

OSD_CLONES void row_max_and_flags(const float* l, int32_t n, float* out_max, bool* out_bad) {
  constexpr int L = 16;
  float m[L];
  int bad[L];
  for (int k = 0; k < L; ++k) m[k] = -std::numeric_limits<float>::infinity(), bad[k] = 0;
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) {
      float x = l[j + k];
      m[k] = x > m[k] ? x : m[k];
      bad[k] |= !(x <= std::numeric_limits<float>::max()) & (x != -std::numeric_limits<float>::infinity());
    }
  float mm = -std::numeric_limits<float>::infinity();
  int b = 0;
  for (; j < n; ++j) {
    float x = l[j];
    mm = x > mm ? x : mm;
    b |= !(x <= std::numeric_limits<float>::max()) & (x != -std::numeric_limits<float>::infinity());
  }
  for (int k = 0; k < L; ++k) mm = m[k] > mm ? m[k] : mm, b |= bad[k];
  *out_max = mm;
  *out_bad = b != 0;
}

// Sum of exp((l_j - max) * inv_t) with a fixed lane order (deterministic, vectorised).
OSD_CLONES double sum_exp(const float* l, int32_t n, float max, float inv_t) {
  constexpr int L = 16;
  float acc[L] = {};
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) acc[k] += exp_approx((l[j + k] - max) * inv_t);
  double total = 0.0;
  for (; j < n; ++j) total += exp_approx((l[j] - max) * inv_t);
  for (int k = 0; k < L; ++k) total += acc[k];
  return total;
}

}  // namespace

float checked_row_max(const float* logits, int32_t vocab, const char* what, size_t row) {
  float m;
  bool bad;
  row_max_and_flags(logits, vocab, &m, &bad);
  if (bad) throw_range(std::string(what) + " row " + std::to_string(row) + " contains NaN or +Infinity");
  if (m == -std::numeric_limits<float>::infinity())
    throw_range(std::string(what) + " row " + std::to_string(row) + " is all -Infinity (no token has probability > 0)");
  return m;
}

int32_t argmax_row(const float* logits, int32_t vocab) {
  int32_t best = 0;
  for (int32_t j = 1; j < vocab; ++j)
    if (logits[j] > logits[best]) best = j;
  return best;
}

double WarpedRow::prob(int32_t token) const {
  if (dense) return exp_approx((logits[token] - max) * inv_t) / z;
  auto it = std::lower_bound(ids.begin(), ids.end(), token);
  return (it != ids.end() && *it == token) ? probs[it - ids.begin()] : 0.0;
}

void WarpedRow::to_dense(float* out) const {
  if (dense) {
    const float inv_z = static_cast<float>(1.0 / z);
    for (int32_t j = 0; j < vocab; ++j) out[j] = exp_approx((logits[j] - max) * inv_t) * inv_z;
    return;
  }
  std::fill(out, out + vocab, 0.0f);
  for (size_t i = 0; i < ids.size(); ++i) out[ids[i]] = probs[i];
}

void warp_row(const float* logits, int32_t vocab, float row_max, const Sampling& s, WarpedRow& out) {
  out.logits = logits;
  out.vocab = vocab;
  out.max = row_max;
  out.inv_t = s.greedy() ? 1.0f : 1.0f / s.temperature;
  out.ids.clear();
  out.probs.clear();
  const bool use_k = s.top_k > 0 && s.top_k < vocab;
  const bool use_p = s.top_p < 1.0f;
  if (!use_k && !use_p) {
    out.dense = true;
    out.z = sum_exp(logits, vocab, row_max, out.inv_t);
    return;
  }
  out.dense = false;
  struct Cand {
    float logit;
    int32_t id;
  };
  std::vector<Cand> cand;
  if (use_k) {
    // Min-heap of the k best; scanning ids in ascending order means an equal logit never displaces
    // an earlier id, so ties go to the lower id.
    auto worse = [](const Cand& a, const Cand& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
    for (int32_t j = 0; j < vocab; ++j) {
      float x = logits[j];
      if (static_cast<int32_t>(heap.size()) < s.top_k) {
        heap.push({x, j});
      } else if (x > heap.top().logit) {
        heap.pop();
        heap.push({x, j});
      }
    }
    cand.reserve(heap.size());
    while (!heap.empty()) cand.push_back(heap.top()), heap.pop();
  } else {
    // Only tokens with p >= (1 - top_p) / (2V) can be in the nucleus: all the others together hold
    // less than 1 - top_p of the mass, so the sorted prefix reaching top_p lies above them.
    double z = sum_exp(logits, vocab, row_max, out.inv_t);
    double floor_p = 0.5 * (1.0 - static_cast<double>(s.top_p)) / vocab;
    float cut = static_cast<float>(row_max + std::log(floor_p * z) / out.inv_t);
    for (int32_t j = 0; j < vocab; ++j)
      if (logits[j] >= cut) cand.push_back({logits[j], j});
  }
  // Probabilities over the candidates, sorted by probability (ties to the lower id).
  std::sort(cand.begin(), cand.end(), [](const Cand& a, const Cand& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  });
  std::vector<double> w(cand.size());
  double total = 0.0;
  for (size_t i = 0; i < cand.size(); ++i) total += (w[i] = exp_approx((cand[i].logit - row_max) * out.inv_t));
  if (!use_k) total = sum_exp(logits, vocab, row_max, out.inv_t);  // nucleus is a fraction of the full mass
  size_t keep = cand.size();
  if (use_p) {
    double cum = 0.0, target = static_cast<double>(s.top_p) * total;
    for (size_t i = 0; i < cand.size(); ++i) {
      cum += w[i];
      if (cum >= target) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += w[i];
  std::vector<std::pair<int32_t, float>> sup(keep);
  for (size_t i = 0; i < keep; ++i) sup[i] = {cand[i].id, static_cast<float>(w[i] / kept)};
  std::sort(sup.begin(), sup.end());
  out.ids.resize(keep);
  out.probs.resize(keep);
  for (size_t i = 0; i < keep; ++i) out.ids[i] = sup[i].first, out.probs[i] = sup[i].second;
  out.z = 1.0;
}

int32_t sample_weights(const float* w, int32_t n, double total, double u) {
  double target = u * total, cum = 0.0;
  int32_t last = -1;
  for (int32_t j = 0; j < n; ++j) {
    if (w[j] <= 0.0f) continue;
    cum += w[j];
    last = j;
    if (cum > target) return j;
  }
  return last;  // rounding left u * total at the very top: take the last token with weight
}

int32_t sample_row(const WarpedRow& row, double u) {
  if (!row.dense) {
    double total = 0.0;
    for (float p : row.probs) total += p;
    // The support always holds the row max (weight 1 before normalising), so i >= 0.
    int32_t i = sample_weights(row.probs.data(), static_cast<int32_t>(row.probs.size()), total, u);
    return row.ids[i];
  }
  double total = 0.0;
  for (int32_t j = 0; j < row.vocab; ++j) total += exp_approx((row.logits[j] - row.max) * row.inv_t);
  double target = u * total, cum = 0.0;
  int32_t last = 0;
  for (int32_t j = 0; j < row.vocab; ++j) {
    float w = exp_approx((row.logits[j] - row.max) * row.inv_t);
    if (w <= 0.0f) continue;
    cum += w;
    last = j;
    if (cum > target) return j;
  }
  return last;
}

}  // namespace osd
