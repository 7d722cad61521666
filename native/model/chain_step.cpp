#include "model/chain_step.h"

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

}  // namespace osd
