// One speculative chain step in one native call: draft g tokens, run the target over them, verify
// the chain and keep what was accepted in both caches. It does what the speculative decoder's
// JavaScript did with three calls (Sequence.draft, Sequence.evaluate, verifyChain), bit for bit;
// on the default pair a round trip to JavaScript cost about as much as a pass of the draft.
#pragma once
#include <cstdint>

#include "model/sequence.h"
#include "spec/sampling.h"

namespace osd {

struct ChainStepParams {
  int32_t count = 1;  // g >= 1 draft tokens
  int32_t vocab = 0;  // V: rows are cut to the vocabulary both models share (<= either model's)
  Sampling sampling;
  uint64_t seed = 0;
  uint64_t draft_stream = 0;   // Philox stream of the draws, draft token i at position i
  uint64_t target_stream = 0;  // verifyChain's stream
};

struct ChainStepTimes {
  double draft_ms = 0, target_ms = 0;  // drafting (with `pending`), and the target pass + verification
};

// Drafts p.count tokens on `draft` after its pending tokens (draft_chain), evaluates `last` and the
// drafted tokens on `target`, and verifies the chain with the current backend (verify_chain_batch).
// Writes draft_tokens[g], out_tokens[accepted + 1] (the accepted tokens and the correction or
// bonus), and target_logits[(g + 1) x V]. Returns the accepted count. The target's cache ends
// holding `last` and the accepted tokens; the draft's, the pending and the accepted tokens it
// evaluated. On an error both caches are left as they were.
int32_t chain_step(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                   const ChainStepParams& p, int32_t* draft_tokens, int32_t* out_tokens, float* target_logits,
                   ChainStepTimes* times = nullptr);

}  // namespace osd
