// One speculative chain step in one native call: draft g tokens, run the target over them, verify
// the chain and keep what was accepted in both caches. It does what the speculative decoder's
// JavaScript did with three calls (Sequence.draft, Sequence.evaluate, verifyChain), bit for bit;
// on the default pair a round trip to JavaScript cost about as much as a pass of the draft.
#pragma once
#include <atomic>
#include <cstdint>
#include <vector>

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

// One (target, draft) pair's share of a batched chain step: chain_step's arguments and outputs.
struct ChainStepMember {
  Sequence* target = nullptr;
  Sequence* draft = nullptr;
  const int32_t* pending = nullptr;
  int32_t n_pending = 0;
  int32_t last = 0;
  const ChainStepParams* params = nullptr;
  int32_t* draft_tokens = nullptr;  // g
  int32_t* out_tokens = nullptr;    // g + 1
  float* target_logits = nullptr;   // (g + 1) x V
  int32_t accepted = 0;             // written
};

// chain_step for several pairs whose targets share one model and whose drafts share another: each
// drafting pass, and the target's pass, runs once for all of them (Sequence::evaluate_parts), so
// the weights stream once per pass for the batch. Each member's tokens, logits and caches end as
// its own chain_step leaves them, bit for bit; the members may draft different lengths. Every
// member is checked before any cache changes, and on an error every cache is left as it was.
void chain_step_batch(ChainStepMember* members, int32_t count, ChainStepTimes* times = nullptr);

// Steps of chain_step run back to back, as the speculative decoder would run them one call at a
// time: the JavaScript round trip between steps (and the thread pool's sleep during it) cost about
// a third of a step on the default pair.
struct ChainRunParams {
  ChainStepParams step;      // count g, vocab, sampling, seed (its streams are set per step)
  uint64_t stream_base = 0;  // step s verifies with stream stream_base + 2 s and drafts with that + 1
  int32_t first_step = 0;    // s of the run's first step
  int32_t max_steps = 1;
  double max_ms = 0;         // no step starts after this long (0: no limit)
  // A step starts only with room for a whole chain: `remaining` (tokens the request may still
  // emit) above g, and room for g + 1 more tokens after the committed ones in both caches.
  int64_t remaining = INT64_MAX;
  const int32_t* stop = nullptr;  // sorted; a step that emits one ends the run
  int32_t n_stop = 0;
  bool keep_logits = false;  // keep the target's rows of every emitted token
};

struct ChainRunOut {
  std::vector<int32_t> accepted;  // per step
  std::vector<int32_t> tokens;    // every emitted token, step after step
  std::vector<float> logits;      // with keep_logits: one row of V per emitted token
  ChainStepTimes times;           // summed over the steps
};

// Runs at least one step (the caller checked the first) and at most max_steps; `interrupt` set
// ends the run after the step in progress. Returns the number of steps run. On an error both caches
// are left as they were before the run.
int32_t chain_run(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                  const ChainRunParams& p, ChainRunOut& out, const std::atomic<bool>* interrupt = nullptr);

// chain_run, joined with the runs that other threads have in progress on the same target and draft
// models: their steps run together (chain_step_batch). A run joins at the next step and leaves when
// its own run ends, the others going on; one of the waiting threads drives the batch at a time.
// Each run's results are its own chain_run's, bit for bit; only the time per step changes. An error
// in a batched step is narrowed down: each of its runs steps again alone, and only a run that fails
// alone fails, with its caches as they were before its run.
int32_t chain_run_joined(Sequence& target, Sequence& draft, const int32_t* pending, int32_t n_pending, int32_t last,
                         const ChainRunParams& p, ChainRunOut& out, const std::atomic<bool>* interrupt = nullptr);

// How many chain runs chain_run_joined has batched, for tests and metrics: steps run, the sum over
// them of the runs in each (their ratio is the mean batch), and batched steps that failed and were
// run again one run at a time (so that only a run that fails alone fails).
struct ChainJoinStats {
  uint64_t steps = 0, members = 0, retried = 0;
};
ChainJoinStats chain_join_stats();

}  // namespace osd
