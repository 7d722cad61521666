#include "spec/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#include <functional>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"
#include "core/thread_pool.h"

// The SIMD helpers of fast_math.h are always inlined, so no vector crosses a call: GCC's warning
// that returning one from a baseline-compiled function changes the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace osd {

// Hot loops are compiled for the baseline, x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512); the
// loader picks one (OSD_SIMD_CLONES, core/fast_math.h).
#define OSD_CLONES OSD_SIMD_CLONES
static_assert(kStatLanes == kSimdGroup, "the blocked sums use fast_math.h's 32 accumulator lanes");

void validate_sampling(const Sampling& s, const std::string& what) {
  if (!std::isfinite(s.temperature) || s.temperature < 0.0f)
    throw_range(what + ".temperature must be a finite number >= 0, got " + num_str(s.temperature));
  // 1 / T must be a finite float: below the smallest normal float it is not (0 * inf = NaN weights).
  if (s.temperature > 0.0f && s.temperature < std::numeric_limits<float>::min())
    throw_range(what + ".temperature must be 0 (greedy) or at least " + num_str(std::numeric_limits<float>::min()) +
                ", got " + num_str(s.temperature));
  if (s.top_k < 0) throw_range(what + ".topK must be an integer >= 0, got " + std::to_string(s.top_k));
  if (!(s.top_p > 0.0f && s.top_p <= 1.0f))
    throw_range(what + ".topP must be in (0, 1], got " + num_str(s.top_p));
}

namespace {

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

// nucleus_candidates' bins: d = (max - l) * inv_t in steps of 1/8, the last bin holding the rest.
constexpr int kNucleusBins = 256;
constexpr float kBinsPerUnit = 8.0f;
inline int nucleus_bin(float l, float max, float inv_t) {
  const float d = (max - l) * inv_t * kBinsPerUnit;
  return d < kNucleusBins - 1 ? static_cast<int>(d) : kNucleusBins - 1;
}

// sum_exp, bit for bit (the same terms, lanes and order), and the sum of the terms of each bin
// into mass (kNucleusBins doubles; bins as nucleus_bin).
template <class V>
OSD_SIMD_INLINE double sum_exp_binned_v(const float* l, int32_t n, float max, float inv_t, double* mass) {
  constexpr int L = kLanes<V>, A = 16 / L;  // sum_exp's 16 lanes
  std::fill(mass, mass + kNucleusBins, 0.0);
  const V vmax = splat<V>(max), vit = splat<V>(inv_t), vper = splat<V>(kBinsPerUnit),
          vlast = splat<V>(kNucleusBins - 1);
  V a[A] = {};
  int32_t j = 0;
  for (; j + 16 <= n; j += 16) {
#pragma GCC unroll 2
    for (int v = 0; v < A; ++v) {
      const V x = vload<V>(l + j + v * L);
      const V e = vexp((x - vmax) * vit);  // exp_approx's bits for these arguments (<= 0)
      a[v] += e;
      V d = (vmax - x) * vit * vper;
      d = d < vlast ? d : vlast;
      const ivec<V> b = __builtin_convertvector(d, ivec<V>);
      for (int k = 0; k < L; ++k) mass[b[k]] += e[k];
    }
  }
  double total = 0.0;
  for (; j < n; ++j) {
    const float e = exp_approx((l[j] - max) * inv_t);
    total += e;
    mass[nucleus_bin(l[j], max, inv_t)] += e;
  }
  for (int v = 0; v < A; ++v)
    for (int k = 0; k < L; ++k) total += a[v][k];
  return total;
}

OSD_CLONES double sum_exp_binned(const float* l, int32_t n, float max, float inv_t, double* mass) {
  return OSD_SIMD_WIDTH(sum_exp_binned_v, l, n, max, inv_t, mass);
}

}  // namespace

float checked_row_max(const float* logits, int32_t vocab, const char* what, size_t row) {
  bool bad;
  const float m = block_max(logits, vocab, &bad);
  throw_row_check(bad ? RowCheck::NotFinite : m == -std::numeric_limits<float>::infinity() ? RowCheck::AllNegInf
                                                                                          : RowCheck::Ok,
                  what, row);
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

OSD_CLONES void WarpedRow::to_dense(float* out) const {
  if (dense) {
    const float inv_z = static_cast<float>(1.0 / z);
    for (int32_t j = 0; j < vocab; ++j) out[j] = exp_approx((logits[j] - max) * inv_t) * inv_z;
    return;
  }
  std::fill(out, out + vocab, 0.0f);
  for (size_t i = 0; i < ids.size(); ++i) out[ids[i]] = probs[i];
}

namespace {

struct Cand {
  float logit;
  int32_t id;
};
// The order of a warped row's support: by probability, ties to the lower id.
bool better(const Cand& a, const Cand& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); }

// Maxima of the 64-entry chunks of a row (the last one may be short).
template <class V> OSD_SIMD_INLINE void chunk_maxima_v(const float* l, int32_t n, float* out) {
  constexpr int L = kLanes<V>;
  int32_t c = 0, j = 0;
  for (; j + 64 <= n; j += 64, ++c) {
    V m = vload<V>(l + j);
    for (int v = 1; v < 64 / L; ++v) m = vmax(m, vload<V>(l + j + L * v));
    float x = m[0];
    for (int k = 1; k < L; ++k) x = m[k] > x ? m[k] : x;
    out[c] = x;
  }
  if (j < n) {
    float x = l[j];
    for (++j; j < n; ++j) x = l[j] > x ? l[j] : x;
    out[c] = x;
  }
}

OSD_CLONES void chunk_maxima(const float* l, int32_t n, float* out) { OSD_SIMD_WIDTH(chunk_maxima_v, l, n, out); }

// The k best logits (in no particular order). The k-th largest chunk maximum is a threshold with at
// least k logits at or above it (one per chunk), so only those logits compete for the k places.
void top_k_candidates(const float* l, int32_t vocab, int32_t k, std::vector<Cand>& cand) {
  const int32_t chunks = (vocab + 63) / 64;
  if (chunks >= k) {
    thread_local std::vector<float> cmax, order;
    cmax.resize(chunks);
    chunk_maxima(l, vocab, cmax.data());
    order.assign(cmax.begin(), cmax.end());
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<float>());
    const float tau = order[k - 1];
    // Only the chunks whose maximum reaches tau hold candidates (at least k of them; usually about k).
    for (int32_t c = 0; c < chunks; ++c) {
      if (cmax[c] < tau) continue;
      for (int32_t j = 64 * c, end = std::min(vocab, j + 64); j < end; ++j)
        if (l[j] >= tau) cand.push_back({l[j], j});
    }
  } else {
    for (int32_t j = 0; j < vocab; ++j) cand.push_back({l[j], j});
  }
  if (static_cast<int32_t>(cand.size()) > k) {
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
    cand.resize(k);
  }
}

// Top-p candidates: a set of the likeliest logits whose mass reaches top_p * z, so that the sorted
// prefix deciding the nucleus lies inside it. The set is whole bins (mass from sum_exp_binned),
// the likeliest first, up to the first bin where their mass passes the target with a margin for
// summing in another order than the sorted one (a relative 1e-9, against at most V * 2^-53). A
// bin holds every logit between two values, so the set is a prefix of the sorted order. Returns
// false when the bins cannot prove it (the caller then takes the loose cut).
bool nucleus_candidates(const float* l, int32_t vocab, float row_max, float inv_t, double target,
                        const double* mass, std::vector<Cand>& cand) {
  const double need = target * (1.0 + 1e-9);
  double bound = 0.0;
  int edge = 0;  // candidates: bins below edge
  while (edge < kNucleusBins - 1 && bound < need) bound += mass[edge++];
  if (bound < need) return false;
  // nucleus_bin(l_j) < edge exactly when d_j < edge (edge <= 255): flags first, in a loop without
  // branches, then only the 8-entry groups holding a candidate are looked at.
  thread_local std::vector<uint8_t> flags;
  flags.resize(vocab);
  uint8_t* const flag = flags.data();  // (a thread_local in the loops costs a TLS lookup each time)
  const float e = static_cast<float>(edge);
  for (int32_t j = 0; j < vocab; ++j) flag[j] = (row_max - l[j]) * inv_t * kBinsPerUnit < e;
  int32_t j = 0;
  for (; j + 8 <= vocab; j += 8) {
    uint64_t any;
    std::memcpy(&any, flag + j, sizeof any);
    if (!any) continue;
    for (int32_t k = j; k < j + 8; ++k)
      if (flag[k]) cand.push_back({l[k], k});
  }
  for (; j < vocab; ++j)
    if (flag[j]) cand.push_back({l[j], j});
  return true;
}

// `better`'s order as 64-bit keys, ascending: the logit's bits mapped to an unsigned order and
// inverted (descending), then the id (ascending). -0 is taken as +0, as `better` compares them equal.
inline uint64_t better_key(float logit, int32_t id) {
  uint32_t b;
  const float x = logit + 0.0f;  // -0 -> +0
  std::memcpy(&b, &x, sizeof b);
  b ^= (b >> 31) ? 0xffffffffu : 0x80000000u;  // float order as unsigned order
  return (static_cast<uint64_t>(~b) << 32) | static_cast<uint32_t>(id);
}

}  // namespace

void radix_sort_u64(uint64_t* keys, size_t n, int from_bit) {
  if (n < 2) return;
  if (n < 256) {  // a comparison sort is quicker than the histograms here
    if (from_bit == 0) {
      std::sort(keys, keys + n);
    } else {
      const uint64_t mask = ~uint64_t{0} << from_bit;
      std::stable_sort(keys, keys + n, [mask](uint64_t a, uint64_t b) { return (a & mask) < (b & mask); });
    }
    return;
  }
  // Least significant digit first, 11 bits a pass, every histogram from one read; a digit that is
  // the same in every key is skipped (the high bits of the ids, and usually the logits' exponents).
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  const int passes = (64 - from_bit + kBits - 1) / kBits;
  thread_local std::vector<uint32_t> hist;
  thread_local std::vector<uint64_t> tmp;
  hist.assign(static_cast<size_t>(passes) * kBuckets, 0);
  tmp.resize(n);
  for (size_t i = 0; i < n; ++i)
    for (int p = 0; p < passes; ++p) ++hist[p * kBuckets + ((keys[i] >> (from_bit + p * kBits)) & (kBuckets - 1))];
  uint64_t* src = keys;
  uint64_t* dst = tmp.data();
  for (int p = 0; p < passes; ++p) {
    uint32_t* h = hist.data() + p * kBuckets;
    const int shift = from_bit + p * kBits;
    if (h[(src[0] >> shift) & (kBuckets - 1)] == n) continue;
    uint32_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) dst[h[(src[i] >> shift) & (kBuckets - 1)]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::memcpy(keys, src, n * sizeof(uint64_t));
}

namespace {

// std::sort(cand, better), on integer keys (no comparator call per comparison).
void sort_better(std::vector<Cand>& cand, const float* logits) {
  thread_local std::vector<uint64_t> key_buf;
  key_buf.resize(cand.size());
  uint64_t* const keys = key_buf.data();
  const size_t n = cand.size();
  for (size_t i = 0; i < n; ++i) keys[i] = better_key(cand[i].logit, cand[i].id);
  radix_sort_u64(keys, n, 0);
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = static_cast<int32_t>(static_cast<uint32_t>(keys[i]));
    cand[i] = {logits[id], id};
  }
}

}  // namespace

OSD_CLONES void warp_row(const float* logits, int32_t vocab, float row_max, const Sampling& s, WarpedRow& out) {
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
  // Candidates: the k best with top-k (ties to the lower id); with top-p alone, a set holding the
  // nucleus (a nucleus is a fraction of the full mass z).
  std::vector<Cand> cand;
  double total = 0.0;
  bool tight = false;
  if (use_k) {
    top_k_candidates(logits, vocab, s.top_k, cand);
  } else {
    double mass[kNucleusBins];
    total = sum_exp_binned(logits, vocab, row_max, out.inv_t, mass);
    tight = nucleus_candidates(logits, vocab, row_max, out.inv_t, static_cast<double>(s.top_p) * total, mass, cand);
  }
  for (;;) {
    if (!use_k && !tight) {
      // Only tokens with p >= (1 - top_p) / (2V) can be in the nucleus: all the others together hold
      // less than 1 - top_p of the mass, so the sorted prefix reaching top_p lies above them.
      const double floor_p = 0.5 * (1.0 - static_cast<double>(s.top_p)) / vocab;
      const float cut = static_cast<float>(row_max + std::log(floor_p * total) / out.inv_t);
      cand.clear();
      for (int32_t j = 0; j < vocab; ++j)
        if (logits[j] >= cut) cand.push_back({logits[j], j});
    }
    // Probabilities over the candidates, sorted by probability (ties to the lower id).
    sort_better(cand, logits);
    std::vector<double> w(cand.size());
    double sum = 0.0;
    for (size_t i = 0; i < cand.size(); ++i) sum += (w[i] = exp_approx((cand[i].logit - row_max) * out.inv_t));
    if (use_k) total = sum;
    size_t keep = cand.size();
    bool reached = !use_p;
    if (use_p) {
      double cum = 0.0, target = static_cast<double>(s.top_p) * total;
      for (size_t i = 0; i < cand.size(); ++i) {
        cum += w[i];
        if (cum >= target) {
          keep = i + 1;
          reached = true;
          break;
        }
      }
    }
    if (tight && !reached) {  // the bound guarantees otherwise; stay exact regardless
      tight = false;
      continue;
    }
    double kept = 0.0;
    for (size_t i = 0; i < keep; ++i) kept += w[i];
    // The support by id: (id, probability bits) as one integer key (ids are distinct).
    std::vector<uint64_t> sup(keep);
    for (size_t i = 0; i < keep; ++i) {
      const float p = static_cast<float>(w[i] / kept);
      uint32_t pb;
      std::memcpy(&pb, &p, sizeof pb);
      sup[i] = (static_cast<uint64_t>(cand[i].id) << 32) | pb;
    }
    radix_sort_u64(sup.data(), sup.size(), 32);  // by id (distinct): the probabilities ride along
    out.ids.resize(keep);
    out.probs.resize(keep);
    for (size_t i = 0; i < keep; ++i) {
      const uint32_t pb = static_cast<uint32_t>(sup[i]);
      out.ids[i] = static_cast<int32_t>(sup[i] >> 32);
      std::memcpy(&out.probs[i], &pb, sizeof pb);
    }
    out.z = 1.0;
    return;
  }
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

OSD_CLONES int32_t sample_row(const WarpedRow& row, double u) {
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

// sample_row on a dense (temperature-only) row, in one pass instead of three (warp_row's z, which
// sampling does not use, then sample_row's total and its scan): the weights come a vector at a
// time (vexp: the bits of exp_approx), the running double sum is the one sample_row accumulates
// in index order, and its prefix sums are kept, so the token is a binary search: the first j whose
// prefix sum exceeds u * total (that sum grew there, so w_j > 0, as sample_row's scan requires).
template <class V> OSD_SIMD_INLINE double prefix_weights_v(const float* l, int32_t vocab, float max, float inv_t, double* cum) {
  constexpr int L = kLanes<V>;
  double total = 0.0;
  int32_t j = 0;
  for (; j + L <= vocab; j += L) {
    const V w = vexp((vload<V>(l + j) - splat<V>(max)) * splat<V>(inv_t));
    for (int k = 0; k < L; ++k) cum[j + k] = (total += w[k]);
  }
  for (; j < vocab; ++j) cum[j] = (total += exp_approx((l[j] - max) * inv_t));
  return total;
}

OSD_CLONES int32_t sample_temperature_row(const float* l, int32_t vocab, float max, float inv_t, double u) {
  thread_local std::vector<double> cum;
  cum.resize(static_cast<size_t>(vocab));
  const double total = OSD_SIMD_WIDTH(prefix_weights_v, l, vocab, max, inv_t, cum.data());
  const double target = u * total;
  const int32_t i = static_cast<int32_t>(std::upper_bound(cum.begin(), cum.end(), target) - cum.begin());
  if (i < vocab) return i;
  // Rounding left u * total at the very top: the last token with weight, as sample_row returns.
  for (int32_t k = vocab - 1; k > 0; --k)
    if (exp_approx((l[k] - max) * inv_t) > 0.0f) return k;
  return 0;
}

int32_t sample_token(const float* logits, int32_t vocab, const Sampling& s, uint64_t seed, uint64_t stream,
                     uint32_t position, const char* what, size_t row) {
  const float mx = checked_row_max(logits, vocab, what, row);
  if (s.greedy()) return argmax_row(logits, vocab);
  const double u = philox_uniform(seed, stream, position, kLaneSample);
  // Dense as warp_row decides it: top-k off or not below the vocabulary, top-p off.
  if (!(s.top_k > 0 && s.top_k < vocab) && s.top_p >= 1.0f) return sample_temperature_row(logits, vocab, mx, 1.0f / s.temperature, u);
  WarpedRow w;
  warp_row(logits, vocab, mx, s, w);
  return sample_row(w, u);
}

// The prefix sums of the weights at ids (in that order); returns the total.
OSD_CLONES double sparse_prefix_weights(const float* l, const int32_t* ids, int32_t n, float max, float inv_t, double* cum) {
  double total = 0.0;
  for (int32_t j = 0; j < n; ++j) cum[j] = (total += exp_approx((l[ids[j]] - max) * inv_t));
  return total;
}

int32_t sample_token_sparse(const float* logits, int32_t vocab, const int32_t* ids, int32_t n_ids, const Sampling& s,
                            uint64_t seed, uint64_t stream, uint32_t position, const char* what, size_t row) {
  if (n_ids == 0 || (!s.greedy() && ((s.top_k > 0 && s.top_k < vocab) || s.top_p < 1.0f)))
    return sample_token(logits, vocab, s, seed, stream, position, what, row);
  const int32_t n = static_cast<int32_t>(std::lower_bound(ids, ids + n_ids, vocab) - ids);
  // checked_row_max over the ids (the rest is -Infinity); the first largest is argmax_row's.
  float mx = -std::numeric_limits<float>::infinity();
  int32_t best = 0;
  bool bad = false;
  for (int32_t j = 0; j < n; ++j) {
    const float x = logits[ids[j]];
    bad |= !(x < std::numeric_limits<float>::infinity());
    if (x > mx) mx = x, best = ids[j];
  }
  throw_row_check(bad ? RowCheck::NotFinite : mx == -std::numeric_limits<float>::infinity() ? RowCheck::AllNegInf : RowCheck::Ok,
                  what, row);
  if (s.greedy()) return best;
  // sample_temperature_row's prefix sums without the zero terms: the same totals, bit for bit.
  const double u = philox_uniform(seed, stream, position, kLaneSample);
  const float inv_t = 1.0f / s.temperature;
  thread_local std::vector<double> cum;
  cum.resize(static_cast<size_t>(n));
  const double total = sparse_prefix_weights(logits, ids, n, mx, inv_t, cum.data());
  const double target = u * total;
  const int32_t i = static_cast<int32_t>(std::upper_bound(cum.begin(), cum.end(), target) - cum.begin());
  if (i < n) return ids[i];
  for (int32_t k = n - 1; k >= 0; --k)
    if (ids[k] > 0 && exp_approx((logits[ids[k]] - mx) * inv_t) > 0.0f) return ids[k];
  return 0;
}

// ---------------------------------------------------------------- the blocked scheme

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace

template <class V> OSD_SIMD_INLINE float block_max_v(const float* l, int32_t n, bool* bad) {
  constexpr int L = kLanes<V>;
  const ivec<V> abs_bits = ~ivec<V>{} & 0x7fffffff;
  V m0 = splat<V>(kNegInf), m1 = m0;
  // The largest |x| bit pattern: above +Infinity's only where some entry is a NaN. (A float compare
  // per entry, `x < inf`, GCC turned into a compare per lane on AVX-512; this stays in vectors.)
  ivec<V> top = {};
  int32_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    // The next block, fetched a block ahead: a short row on one thread otherwise waits on every
    // 4 KiB page (measured 1.3x faster on one thread; a hint, it never faults).
    __builtin_prefetch(l + j + kStatBlock);
    if (L == 16) __builtin_prefetch(l + j + kStatBlock + 16);
    const V x0 = vload<V>(l + j), x1 = vload<V>(l + j + L);
    m0 = vmax(m0, x0);
    m1 = vmax(m1, x1);
    const ivec<V> b0 = (ivec<V>)x0 & abs_bits, b1 = (ivec<V>)x1 & abs_bits;
    top = b0 > top ? b0 : top;
    top = b1 > top ? b1 : top;
  }
  const V mv = vmax(m0, m1);
  float mx = kNegInf;
  bool b = false;
  for (int k = 0; k < L; ++k) mx = mv[k] > mx ? mv[k] : mx, b |= top[k] > 0x7f800000;
  for (; j < n; ++j) {
    const float x = l[j];
    mx = x > mx ? x : mx;
    b |= !(x < -kNegInf);
  }
  *bad = b || mx == -kNegInf;  // NaN anywhere, or +Infinity (the max is NaN-blind)
  return mx;
}

OSD_CLONES float block_max(const float* l, int32_t n, bool* bad) { return OSD_SIMD_WIDTH(block_max_v, l, n, bad); }

namespace {

// The whole 32-entry groups of block_exp_sum; returns where the short last group starts. With
// kUnitT (temperature 1) the multiply by inv_t = 1 is left out: the same values, fewer operations.
// The loop over the group's vectors is unrolled so that GCC keeps the sums in registers (a loop
// over an array it did not unroll spilled them every iteration and ran about 20% slower).
template <class V, bool kUnitT, bool kStore>
OSD_SIMD_INLINE int32_t exp_sum_groups(const float* l, int32_t n, float ref, float inv_t, float* e, Lanes32<V>& acc,
                                       const float* side, int32_t side_n) {
  constexpr int L = kLanes<V>;
  const V vref = splat<V>(ref), vit = splat<V>(inv_t);
  int32_t j = 0;
  for (; j + kStatLanes <= n; j += kStatLanes) {
    // The blocked passes read the next kStatBlock entries next: fetch them while this block's exps
    // keep the core busy (a hint; it never faults, also past the end of the array).
    __builtin_prefetch(l + j + kStatBlock);
    __builtin_prefetch(l + j + kStatBlock + 16);
    if (j < side_n) __builtin_prefetch(side + j), __builtin_prefetch(side + j + 16);
#pragma GCC unroll 4
    for (int v = 0; v < kStatLanes / L; ++v) {
      V d = vload<V>(l + j + v * L) - vref;
      if (!kUnitT) d = d * vit;
      const V x = vexp(d);
      if (kStore) vstore(e + j + v * L, x);
      acc.v[v] += x;
    }
  }
  return j;
}

template <class V>
OSD_SIMD_INLINE float block_exp_sum_v(const float* l, int32_t n, float ref, float inv_t, float* e, const float* side,
                                      int32_t side_n) {
  Lanes32<V> acc;
  const bool unit = inv_t == 1.0f;
  const int32_t j = e ? (unit ? exp_sum_groups<V, true, true>(l, n, ref, inv_t, e, acc, side, side_n)
                              : exp_sum_groups<V, false, true>(l, n, ref, inv_t, e, acc, side, side_n))
                      : (unit ? exp_sum_groups<V, true, false>(l, n, ref, inv_t, e, acc, side, side_n)
                              : exp_sum_groups<V, false, false>(l, n, ref, inv_t, e, acc, side, side_n));
  float a[kStatLanes];
  acc.spill(a);  // the entries of a short last group go lane by lane
  for (int32_t k = j; k < n; ++k) {
    const float x = exp_approx((l[k] - ref) * inv_t);
    if (e) e[k] = x;
    a[k % kStatLanes] += x;
  }
  return fold_lanes32(a);
}

}  // namespace

OSD_CLONES float block_exp_sum(const float* l, int32_t n, float ref, float inv_t, float* e, const float* side,
                               int32_t side_n) {
  return OSD_SIMD_WIDTH(block_exp_sum_v, l, n, ref, inv_t, e, side, side_n);
}

namespace {

// r_j = max(0, ep_j * ap - eq_j * aq) into r; returns lane_sum(r).
template <class V>
OSD_SIMD_INLINE float block_residual_v(const float* ep, const float* eq, int32_t n, float ap, float aq, float* r) {
  constexpr int L = kLanes<V>;
  const V vap = splat<V>(ap), vaq = splat<V>(aq), zero = {};
  Lanes32<V> acc;
  int32_t j = 0;
  for (; j + kStatLanes <= n; j += kStatLanes)
#pragma GCC unroll 4
    for (int v = 0; v < kStatLanes / L; ++v) {
      const V d = vload<V>(ep + j + L * v) * vap - vload<V>(eq + j + L * v) * vaq;
      const V x = d > zero ? d : zero;
      vstore(r + j + L * v, x);
      acc.v[v] += x;
    }
  float a[kStatLanes];
  acc.spill(a);
  for (; j < n; ++j) {
    const float d = ep[j] * ap - eq[j] * aq;
    r[j] = d > 0.0f ? d : 0.0f;
    a[j % kStatLanes] += r[j];
  }
  return fold_lanes32(a);
}

OSD_CLONES float block_residual(const float* ep, const float* eq, int32_t n, float ap, float aq, float* r) {
  return OSD_SIMD_WIDTH(block_residual_v, ep, eq, n, ap, aq, r);
}

}  // namespace

void throw_row_check(RowCheck c, const char* what, size_t row) {
  if (c == RowCheck::NotFinite)
    throw_range(std::string(what) + " row " + std::to_string(row) + " contains NaN or +Infinity");
  if (c == RowCheck::AllNegInf)
    throw_range(std::string(what) + " row " + std::to_string(row) + " is all -Infinity (no token has probability > 0)");
}

void check_rows(const float* rows, size_t count, int32_t vocab, RowCheck* check, float* max) {
  const int32_t nb = stat_blocks(vocab);
  std::vector<float> bm(count * nb);
  std::vector<uint8_t> bad(count * nb);
  // At least 16K entries per chunk: a pool hop costs more than validating a few short rows.
  const size_t grain = std::max<size_t>(1, (size_t(1) << 14) / std::min(vocab, kStatBlock));
  default_pool().parallel_for(count * nb, grain, [&](size_t lo, size_t hi) {
    for (size_t it = lo; it < hi; ++it) {
      const size_t r = it / nb;
      const int32_t j0 = static_cast<int32_t>(it % nb) * kStatBlock;
      bool b;
      bm[it] = block_max(rows + r * vocab + j0, std::min(kStatBlock, vocab - j0), &b);
      bad[it] = b;
    }
  });
  for (size_t r = 0; r < count; ++r) {
    float m = kNegInf;
    bool b = false;
    for (int32_t k = 0; k < nb; ++k) m = std::max(m, bm[r * nb + k]), b |= bad[r * nb + k] != 0;
    check[r] = b ? RowCheck::NotFinite : m == kNegInf ? RowCheck::AllNegInf : RowCheck::Ok;
    max[r] = m;
  }
}

double DenseRow::prob(int32_t token) const {
  const int32_t b = token / kStatBlock;
  return static_cast<double>(e[token] * scale[b]) / z;
}

void dense_rows(const float* const* logits, int32_t n, int32_t vocab, float inv_t, DenseRow* const* out) {
  const int32_t nb = stat_blocks(vocab);
  for (int32_t r = 0; r < n; ++r) {
    DenseRow& d = *out[r];
    d.logits = logits[r];
    d.vocab = vocab;
    d.inv_t = inv_t;
    d.e.resize(vocab);
    d.bmax.resize(nb), d.bsum.resize(nb), d.scale.resize(nb), d.mass.resize(nb), d.bad.resize(nb);
  }
  // Each block is read once: its max, then its exp terms from L1. Chunks of at least 4 blocks (a
  // few microseconds of exps): short rows stay on the calling thread.
  default_pool().parallel_for(static_cast<size_t>(n) * nb, 4, [&](size_t lo, size_t hi) {
    for (size_t it = lo; it < hi; ++it) {
      DenseRow& d = *out[it / nb];
      const int32_t b = static_cast<int32_t>(it % nb), j0 = b * kStatBlock, len = std::min(kStatBlock, vocab - j0);
      bool bad;
      const float bm = block_max(d.logits + j0, len, &bad);
      d.bmax[b] = bm;
      d.bad[b] = bad;
      if (bad || bm == kNegInf) {
        std::fill(d.e.begin() + j0, d.e.begin() + j0 + len, 0.0f);
        d.bsum[b] = 0.0f;
      } else {
        d.bsum[b] = block_exp_sum(d.logits + j0, len, bm, inv_t, d.e.data() + j0);
      }
    }
  });
  for (int32_t r = 0; r < n; ++r) {
    DenseRow& d = *out[r];
    float m = kNegInf;
    bool bad = false;
    for (int32_t b = 0; b < nb; ++b) m = std::max(m, d.bmax[b]), bad |= d.bad[b] != 0;
    d.check = bad ? RowCheck::NotFinite : m == kNegInf ? RowCheck::AllNegInf : RowCheck::Ok;
    d.max = m;
    d.z = 0.0;
    if (d.check != RowCheck::Ok) continue;
    for (int32_t b = 0; b < nb; ++b) {
      d.scale[b] = d.bmax[b] == kNegInf ? 0.0f : exp_approx((d.bmax[b] - m) * inv_t);
      d.mass[b] = d.bsum[b] * d.scale[b];
      d.z += d.mass[b];
    }
  }
}

// Group sums locate the entry, then one group is added in order. Any two summation orders of the
// same m <= n + 1 non-negative terms (cum0 and weights) give partial sums within a factor
// 1 +- 2 (n + 1) 2^-53 of each other, so an entry whose partial sums clear target by that factor
// on both sides is where the sum in index order crosses too (its partial sums never decrease).
// cuda/chain_blocked.cu decides the same way.
OSD_CLONES int32_t find_crossing(const float* w, int32_t n, double cum0, double target) {
  constexpr int32_t kGroup = 64;
  const double eps = 4.01 * (static_cast<double>(n) + 2.0) * 0x1p-53;
  double c = cum0;
  for (int32_t j0 = 0; j0 < n; j0 += kGroup) {
    const int32_t len = std::min(kGroup, n - j0);
    double a[16] = {};  // two vectors of independent sums
    int32_t j = 0;
    for (; j + 16 <= len; j += 16)
      for (int k = 0; k < 16; ++k) a[k] += static_cast<double>(w[j0 + j + k]);
    for (; j < len; ++j) a[0] += static_cast<double>(w[j0 + j]);
    for (int k = 0; k < 8; ++k) a[k] += a[k + 8];
    const double group = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    if (!(c + group > target)) {
      c += group;
      continue;
    }
    for (j = j0; j < j0 + len; ++j) {
      const double before = c;
      c += static_cast<double>(w[j]);
      if (c > target) return c * (1.0 - eps) > target && before * (1.0 + eps) < target ? j : -1;
    }
    return -1;
  }
  return -1;
}

namespace {

// sample_blocks with the weights of a block formed on demand: fill(b, w) writes block b's weights
// into w (kStatBlock floats). Only the chosen block is formed (and, when rounding runs past it,
// the ones after it).
template <class Fill>
int32_t sample_by_blocks(const float* bmass, int32_t vocab, double u, Fill&& fill) {
  const int32_t nb = stat_blocks(vocab);
  double total = 0.0;
  for (int32_t b = 0; b < nb; ++b) total += bmass[b];
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  alignas(32) float w[kStatBlock];
  for (int32_t b = 0; b < nb; ++b) {
    if (!(bmass[b] > 0.0f)) continue;
    if (cum + bmass[b] <= target) {
      cum += bmass[b];
      continue;
    }
    fill(b, w);
    const int32_t n = std::min(kStatBlock, vocab - b * kStatBlock);
    // Weights that are not positive become +0 first, and adding +0 leaves cum as it was: the same
    // entry as skipping them, without a branch per entry (a residual is zero at about half its
    // entries, and the mispredictions made this scan about 2.7x slower).
    for (int32_t j = 0; j < n; ++j) w[j] = w[j] > 0.0f ? w[j] : 0.0f;
    const int32_t hit = find_crossing(w, n, cum, target);
    if (hit >= 0) return b * kStatBlock + hit;
    for (int32_t j = 0; j < n; ++j) {
      cum += w[j];
      if (cum > target) return b * kStatBlock + j;
    }
  }
  // Rounding left u * total at the very top: the last entry with weight.
  for (int32_t b = nb - 1; b >= 0; --b) {
    fill(b, w);
    for (int32_t j = std::min(kStatBlock, vocab - b * kStatBlock) - 1; j >= 0; --j)
      if (w[j] > 0.0f) return b * kStatBlock + j;
  }
  return -1;
}

}  // namespace

int32_t sample_blocks(const float* w, const float* wscale, const float* bmass, int32_t vocab, double u) {
  return sample_by_blocks(bmass, vocab, u, [&](int32_t b, float* out) {
    const float sc = wscale ? wscale[b] : 1.0f;
    const int32_t j0 = b * kStatBlock, n = std::min(kStatBlock, vocab - j0);
    for (int32_t j = 0; j < n; ++j) out[j] = w[j0 + j] * sc;
  });
}

int32_t sample_dense(const DenseRow& row, double u) {
  return sample_blocks(row.e.data(), row.scale.data(), row.mass.data(), row.vocab, u);
}

int32_t sample_residual_dense(const DenseRow& p, const DenseRow& q, double u, std::vector<float>& r,
                              std::vector<float>& rmass) {
  const int32_t V = p.vocab, nb = stat_blocks(V);
  r.resize(V);
  rmass.resize(nb);
  default_pool().parallel_for(nb, 4, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int32_t j0 = static_cast<int32_t>(b) * kStatBlock, len = std::min(kStatBlock, V - j0);
      const float ap = static_cast<float>(p.scale[b] / p.z), aq = static_cast<float>(q.scale[b] / q.z);
      rmass[b] = block_residual(p.e.data() + j0, q.e.data() + j0, len, ap, aq, r.data() + j0);
    }
  });
  const int32_t x = sample_blocks(r.data(), nullptr, rmass.data(), V, u);
  return x >= 0 ? x : sample_dense(p, u);
}

// ---------------------------------------------------------------- rows from block statistics

void block_stats(const float* l, int32_t n, float inv_t, bool sum, BlockStat& out, float* e, const float* side,
                 int32_t side_n) {
  bool bad;
  out.max = block_max(l, n, &bad);
  out.bad = bad;
  out.sum = 0.0f;
  if (sum) block_sum(l, n, inv_t, out, e, side, side_n);  // the block was just read: from L1
}

void block_sum(const float* l, int32_t n, float inv_t, BlockStat& out, float* e, const float* side,
               int32_t side_n) {
  out.sum = 0.0f;
  if (out.bad) return;
  if (out.max == kNegInf) {
    if (e) std::fill(e, e + n, 0.0f);
    return;
  }
  out.sum = block_exp_sum(l, n, out.max, inv_t, e, side, side_n);
}

namespace {

// The exp terms of block b of a row: stored, or recomputed from the logits.
const float* row_block_exps(const BlockedRow& r, int32_t b, float* buf) {
  const int32_t j0 = b * kStatBlock, n = std::min(kStatBlock, r.vocab - j0);
  if (r.e) return r.e + j0;
  const float bm = r.blocks[b].max;
  if (bm == kNegInf)
    std::fill(buf, buf + n, 0.0f);
  else
    block_exp_sum(r.logits + j0, n, bm, r.inv_t, buf);
  return buf;
}

}  // namespace

double BlockedRow::prob(int32_t token) const {
  const int32_t b = token / kStatBlock;
  const float bm = blocks[b].max;
  // exp_approx on one lane gives vexp's bits (fast_math.h).
  const float x = e ? e[token] : bm == kNegInf ? 0.0f : exp_approx((logits[token] - bm) * inv_t);
  return static_cast<double>(x * scale[b]) / z;
}

void finish_row_check(BlockedRow& r) {
  const int32_t nb = stat_blocks(r.vocab);
  float m = kNegInf;
  bool bad = false;
  for (int32_t b = 0; b < nb; ++b) m = std::max(m, r.blocks[b].max), bad |= r.blocks[b].bad != 0;
  r.check = bad ? RowCheck::NotFinite : m == kNegInf ? RowCheck::AllNegInf : RowCheck::Ok;
  r.max = m;
}

void finish_row(BlockedRow& r) {
  finish_row_check(r);
  r.z = 0.0;
  if (r.check != RowCheck::Ok) return;
  const int32_t nb = stat_blocks(r.vocab);
  for (int32_t b = 0; b < nb; ++b) {
    const float bm = r.blocks[b].max;
    r.scale[b] = bm == kNegInf ? 0.0f : exp_approx((bm - r.max) * r.inv_t);
    r.mass[b] = r.blocks[b].sum * r.scale[b];
    r.z += r.mass[b];
  }
}

int32_t sample_blocked(const BlockedRow& row, double u) {
  return sample_by_blocks(row.mass, row.vocab, u, [&](int32_t b, float* w) {
    const float* e = row_block_exps(row, b, w);
    const int32_t n = std::min(kStatBlock, row.vocab - b * kStatBlock);
    for (int32_t j = 0; j < n; ++j) w[j] = e[j] * row.scale[b];
  });
}

namespace {

// Block b of the residual of two blocked rows: r_j into r; returns R_b.
float residual_block(const BlockedRow& p, const BlockedRow& q, int32_t b, float* r) {
  alignas(32) float bp[kStatBlock], bq[kStatBlock];
  const int32_t n = std::min(kStatBlock, p.vocab - b * kStatBlock);
  const float* ep = row_block_exps(p, b, bp);
  const float* eq = row_block_exps(q, b, bq);
  const float ap = static_cast<float>(p.scale[b] / p.z), aq = static_cast<float>(q.scale[b] / q.z);
  return block_residual(ep, eq, n, ap, aq, r);
}

}  // namespace

int32_t sample_residual_blocked(const BlockedRow& p, const BlockedRow& q, double u, float* rmass) {
  const int32_t nb = stat_blocks(p.vocab);
  // From stored exp terms a block is a few microseconds of loads: a hop to the pool pays from
  // several blocks on; recomputed, two exps per entry pay from two. At most one chunk per thread:
  // the block split of the chain's read, so each thread finds the exp terms it stored.
  const size_t grain = default_pool().grain_per_thread(nb, p.e && q.e ? 8 : 2);
  default_pool().parallel_for(nb, grain, [&](size_t lo, size_t hi) {
    alignas(32) float r[kStatBlock];
    for (size_t b = lo; b < hi; ++b) rmass[b] = residual_block(p, q, static_cast<int32_t>(b), r);
  });
  const int32_t x = sample_by_blocks(rmass, p.vocab, u, [&](int32_t b, float* w) { residual_block(p, q, b, w); });
  return x >= 0 ? x : sample_blocked(p, u);
}

}  // namespace osd
