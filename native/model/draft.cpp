#include "model/draft.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"

namespace osd {

void check_draft_chain(const Sequence& seq, int32_t n, int32_t count, int32_t vocab, const Sampling& s) {
  const int32_t vm = seq.model().config().vocab;
  if (n <= 0) throw_range("tokens must not be empty");
  if (count < 1) throw_range("count must be >= 1, got " + std::to_string(count));
  if (vocab < 1 || vocab > vm) throw_range("vocabSize must be in [1, " + std::to_string(vm) + "], got " + std::to_string(vocab));
  validate_sampling(s);
  const int64_t need = int64_t(seq.length()) + n + count - 1;
  if (need > seq.capacity())
    throw_range("the sequence would hold " + std::to_string(need) + " tokens, more than its context of " +
                std::to_string(seq.capacity()));
}

int32_t draft_chain(Sequence& seq, const int32_t* tokens, int32_t n, const DraftParams& p, int32_t* out_tokens,
                 float* out_logits, const std::atomic<bool>* cancel) {
  const int32_t vm = seq.model().config().vocab;
  check_draft_chain(seq, n, p.count, p.vocab, p.sampling);
  const int32_t start = seq.length();
  const std::vector<int32_t>& head = seq.model().config().head_tokens;  // a restricted head's ids
  // Rows as wide as the model's go straight to the output; wider ones are cut to `vocab`.
  std::vector<float> scratch(p.vocab == vm ? 0 : vm);
  try {
    for (int32_t i = 0; i < p.count; ++i) {
      if (i > 0 && cancel && cancel->load(std::memory_order_relaxed)) {
        seq.truncate(start);
        return 0;
      }
      float* row = out_logits + static_cast<size_t>(i) * p.vocab;
      float* dst = scratch.empty() ? row : scratch.data();
      if (i == 0) seq.evaluate(tokens, n, nullptr, dst, true);
      else seq.evaluate(&out_tokens[i - 1], 1, nullptr, dst, true);
      if (!scratch.empty()) std::memcpy(row, dst, sizeof(float) * p.vocab);
      const uint32_t pos = p.positions ? p.positions[i] : p.position + static_cast<uint32_t>(i);
      out_tokens[i] = sample_token_sparse(row, p.vocab, head.data(), static_cast<int32_t>(head.size()), p.sampling, p.seed,
                                          p.stream, pos, "draft logits", i);
      if (p.n_stop > 0 && std::binary_search(p.stop, p.stop + p.n_stop, out_tokens[i])) return i + 1;
    }
  } catch (...) {
    seq.truncate(start);
    throw;
  }
  return p.count;
}

}  // namespace osd
