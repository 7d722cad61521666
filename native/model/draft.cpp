#include "model/draft.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"

// The SIMD helpers are inlined into their callers (see core/fast_math.h).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace osd {

// sample_row on a dense (temperature-only) row, in one pass instead of three (warp_row's z, which
// sampling does not use, then sample_row's total and its scan): the weights come eight at a time
// (exp_approx8: the bits of exp_approx), the running double sum is the one sample_row accumulates
// in index order, and its prefix sums are kept, so the token is a binary search: the first j whose
// prefix sum exceeds u * total (that sum grew there, so w_j > 0, as sample_row's scan requires).
OSD_SIMD_CLONES int32_t sample_temperature_row(const float* l, int32_t vocab, float max, float inv_t, double u) {
  thread_local std::vector<double> cum;
  cum.resize(static_cast<size_t>(vocab));
  double total = 0.0;
  int32_t j = 0;
  for (; j + 8 <= vocab; j += 8) {
    const f32x8 w = exp_approx8((load8(l + j) - splat8(max)) * splat8(inv_t));
    for (int k = 0; k < 8; ++k) cum[j + k] = (total += w[k]);
  }
  for (; j < vocab; ++j) cum[j] = (total += exp_approx((l[j] - max) * inv_t));
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

bool draft_chain(Sequence& seq, const int32_t* tokens, int32_t n, const DraftParams& p, int32_t* out_tokens,
                 float* out_logits, const std::atomic<bool>* cancel) {
  const int32_t vm = seq.model().config().vocab;
  if (n <= 0) throw_range("tokens must not be empty");
  if (p.count < 1) throw_range("count must be >= 1, got " + std::to_string(p.count));
  if (p.vocab < 1 || p.vocab > vm)
    throw_range("vocabSize must be in [1, " + std::to_string(vm) + "], got " + std::to_string(p.vocab));
  validate_sampling(p.sampling);
  const int64_t need = int64_t(seq.length()) + n + p.count - 1;
  if (need > seq.capacity())
    throw_range("the sequence would hold " + std::to_string(need) + " tokens, more than its context of " +
                std::to_string(seq.capacity()));
  const int32_t start = seq.length();
  // Rows as wide as the model's go straight to the output; wider ones are cut to `vocab`.
  std::vector<float> scratch(p.vocab == vm ? 0 : vm);
  try {
    for (int32_t i = 0; i < p.count; ++i) {
      if (i > 0 && cancel && cancel->load(std::memory_order_relaxed)) {
        seq.truncate(start);
        return false;
      }
      float* row = out_logits + static_cast<size_t>(i) * p.vocab;
      float* dst = scratch.empty() ? row : scratch.data();
      if (i == 0) seq.evaluate(tokens, n, nullptr, dst, true);
      else seq.evaluate(&out_tokens[i - 1], 1, nullptr, dst, true);
      if (!scratch.empty()) std::memcpy(row, dst, sizeof(float) * p.vocab);
      const uint32_t pos = p.positions ? p.positions[i] : p.position + static_cast<uint32_t>(i);
      out_tokens[i] = sample_token(row, p.vocab, p.sampling, p.seed, p.stream, pos, "draft logits", i);
    }
  } catch (...) {
    seq.truncate(start);
    throw;
  }
  return true;
}

}  // namespace osd
