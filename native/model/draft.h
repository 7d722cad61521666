// Autoregressive drafting in one native call: evaluate, sample, feed the token back, g times. Each
// token is drawn exactly as sampleLogits draws it (sample_token), so a chain drafted here is the
// chain that a JavaScript loop of evaluate() and sampleLogits() would draft for the same seed.
#pragma once
#include <atomic>
#include <cstdint>

#include "model/sequence.h"
#include "spec/sampling.h"

namespace osd {

struct DraftParams {
  int32_t count = 1;   // draft tokens to propose (>= 1)
  int32_t vocab = 0;   // row width sampled and returned: the first `vocab` logits (<= the model's)
  Sampling sampling;
  uint64_t seed = 0, stream = 0;
  uint32_t position = 0;               // Philox position of draft token i: position + i ...
  const uint32_t* positions = nullptr;  // ... or positions[i] when given
  // Drawing one of these ends the chain early (plain generation stops at end-of-sequence tokens
  // without paying for passes past them). Sorted ascending; null when n_stop is 0.
  const int32_t* stop = nullptr;
  int32_t n_stop = 0;
};

// draft_chain's checks of its arguments (RangeError naming each): n > 0 tokens to evaluate, count,
// vocab and sampling, and room in the sequence for the n tokens and draft tokens 0..count-2.
void check_draft_chain(const Sequence& seq, int32_t n, int32_t count, int32_t vocab, const Sampling& s);

// Evaluates tokens[0..n) after the sequence's length, then for i < count samples draft token i
// from the latest row and, if i + 1 < count and it is not a stop token, evaluates it. Returns the
// number of tokens drawn, d (count, or fewer when token d - 1 is a stop token), with out_tokens[d]
// and out_logits[d x vocab] written (row i is the distribution token i was drawn from) and the
// cache holding the n tokens and draft tokens 0..d-2. Returns 0, with the cache as it was, when
// `cancel` became true between passes; on an error the cache is also restored before rethrowing.
int32_t draft_chain(Sequence& seq, const int32_t* tokens, int32_t n, const DraftParams& p, int32_t* out_tokens,
                 float* out_logits, const std::atomic<bool>* cancel = nullptr);

}  // namespace osd
