#include "model/chain_step.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "backend/select.h"
#include "core/error.h"
#include "model/draft.h"

namespace osd {

int32_t chain_step(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                   const ChainStepParams& p, int32_t* draft_tokens, int32_t* out_tokens, float* target_logits,
                   ChainStepTimes* times) {
  const int32_t g = p.count, V = p.vocab, vt = target.model().config().vocab;
  if (g < 1) throw_range("count must be >= 1, got " + std::to_string(g));
  if (V < 1 || V > vt)
    throw_range("vocabSize must be in [1, " + std::to_string(vt) + "] (the target's vocabulary), got " + std::to_string(V));
  if (last < 0 || last >= vt)
    throw_range("last = " + std::to_string(last) + " is out of range for a vocabulary of " + std::to_string(vt));
  const int64_t need = int64_t(target.length()) + g + 1;
  if (need > target.capacity())
    throw_range("the target sequence would hold " + std::to_string(need) + " tokens, more than its context of " +
                std::to_string(target.capacity()));
  const int32_t t0 = target.length(), d0 = draft.length();
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  thread_local std::vector<float> draft_rows, wide;
  draft_rows.resize(static_cast<size_t>(g) * V);
  DraftParams dp;
  dp.count = g;
  dp.vocab = V;
  dp.sampling = p.sampling;
  dp.seed = p.seed;
  dp.stream = p.draft_stream;
  draft_chain(draft, pending, n_pending, dp, draft_tokens, draft_rows.data());  // checks its own input
  const auto drafted = clock::now();
  int32_t accepted = 0;
  try {
    thread_local std::vector<int32_t> input;
    input.assign(1, last);
    input.insert(input.end(), draft_tokens, draft_tokens + g);
    if (vt == V) {
      target.evaluate(input.data(), g + 1, nullptr, target_logits);
    } else {
      wide.resize(static_cast<size_t>(g + 1) * vt);
      target.evaluate(input.data(), g + 1, nullptr, wide.data());
      for (int32_t i = 0; i <= g; ++i)
        std::memcpy(target_logits + static_cast<size_t>(i) * V, wide.data() + static_cast<size_t>(i) * vt, sizeof(float) * V);
    }
    int32_t len = g;
    uint64_t stream = p.target_stream;
    ChainBatch b;
    b.target = target_logits;
    b.draft = p.sampling.greedy() ? nullptr : draft_rows.data();
    b.tokens = draft_tokens;
    b.lengths = &len;
    b.streams = &stream;
    b.sampling = &p.sampling;
    b.batch = 1;
    b.vocab = V;
    b.seed = p.seed;
    ChainBatchOut bo{&accepted, out_tokens};
    current_backend().verify_chain_batch(b, bo);
  } catch (...) {
    if (target.length() > t0) target.truncate(t0);
    draft.truncate(d0);
    throw;
  }
  // Keep `last` and the accepted tokens; the draft evaluated its pending tokens and draft tokens
  // 0..g-2, of which the accepted ones stay.
  target.truncate(t0 + 1 + accepted);
  if (draft.length() > d0 + n_pending + accepted) draft.truncate(d0 + n_pending + accepted);
  if (times) {
    const auto end = clock::now();
    times->draft_ms = std::chrono::duration<double, std::milli>(drafted - start).count();
    times->target_ms = std::chrono::duration<double, std::milli>(end - drafted).count();
  }
  return accepted;
}

int32_t chain_run(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                  const ChainRunParams& p, ChainRunOut& out, const std::atomic<bool>* interrupt) {
  const int32_t g = p.step.count, V = p.step.vocab;
  out.accepted.clear();
  out.tokens.clear();
  out.logits.clear();
  out.times = ChainStepTimes{};
  std::vector<int32_t> next(pending, pending + n_pending), draft_tokens(g), emitted(g + 1);
  std::vector<float> rows(static_cast<size_t>(g + 1) * V);
  const auto start = std::chrono::steady_clock::now();
  int64_t remaining = p.remaining;
  int32_t steps = 0;
  const int32_t t_start = target.length(), d_start = draft.length();
  for (;;) {
    ChainStepParams sp = p.step;
    const uint64_t s = static_cast<uint64_t>(p.first_step) + static_cast<uint64_t>(steps);
    sp.target_stream = p.stream_base + 2 * s;
    sp.draft_stream = sp.target_stream + 1;
    const int32_t d_before = draft.length();
    ChainStepTimes t;
    int32_t a = 0;
    try {
      a = chain_step(target, draft, next.data(), static_cast<int32_t>(next.size()), last, sp, draft_tokens.data(),
                     emitted.data(), rows.data(), &t);
    } catch (...) {
      // The caller gets no tokens: the caches go back to where the run started.
      if (target.length() > t_start) target.truncate(t_start);
      if (draft.length() > d_start) draft.truncate(d_start);
      throw;
    }
    out.times.draft_ms += t.draft_ms;
    out.times.target_ms += t.target_ms;
    out.accepted.push_back(a);
    out.tokens.insert(out.tokens.end(), emitted.begin(), emitted.begin() + a + 1);
    if (p.keep_logits) out.logits.insert(out.logits.end(), rows.begin(), rows.begin() + static_cast<size_t>(a + 1) * V);
    ++steps;
    remaining -= a + 1;
    bool stop = false;
    for (int32_t i = 0; i <= a && !stop; ++i) stop = p.n_stop > 0 && std::binary_search(p.stop, p.stop + p.n_stop, emitted[i]);
    // The committed tokens are the target's cache and `last` (the correction or bonus token).
    const int64_t committed = int64_t(target.length()) + 1;
    const bool room = remaining > g && committed + g + 1 <= target.capacity() && committed + g + 1 <= draft.capacity();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (stop || !room || steps >= p.max_steps || (p.max_ms > 0 && ms >= p.max_ms)) break;
    if (interrupt && interrupt->load(std::memory_order_relaxed)) break;
    // The draft holds what it had, the pending tokens and the accepted ones it evaluated; the rest
    // of the emitted tokens are the next step's pending ones.
    const int32_t kept = draft.length() - (d_before + static_cast<int32_t>(next.size()));
    next.assign(emitted.begin() + kept, emitted.begin() + a + 1);
    last = emitted[a];
  }
  return steps;
}

}  // namespace osd
