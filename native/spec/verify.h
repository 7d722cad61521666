// Exact verification of drafted tokens: chains (Leviathan et al. 2023; Chen et al. 2023) and
// trees (SpecInfer's multi-step speculative sampling, with or without replacement).
// This is the CPU reference; the CUDA backend makes the same decisions from the same Philox draws.
#pragma once
#include <cstdint>
#include <vector>

#include "spec/sampling.h"

namespace osd {

// Deliberate bugs used only by the statistics tests, to prove they can catch a wrong kernel.
enum class Fault : int32_t { None = 0, ResidualNoClamp = 1, ResidualFromTarget = 2 };

// Row maximum (after NaN/+Inf validation) and, for temperature-only sampling, the softmax
// normaliser z = sum exp((l - max) / T). Verification needs these for every row it reads.
struct RowStats {
  float max = 0.0f;
  double z = 0.0;
};
void compute_row_stats(const float* row, int32_t vocab, const Sampling& s, const char* what, size_t row_index,
                       RowStats& out);

struct ChainInput {
  const float* target = nullptr;  // (g + 1) x V
  const float* draft = nullptr;   // g x V, unused (may be null) when greedy
  const int32_t* tokens = nullptr;  // g draft tokens
  int32_t g = 0;
  int32_t vocab = 0;
  // Precomputed stats for each row (g + 1 target rows, g draft rows), or null to compute here.
  const RowStats* target_stats = nullptr;
  const RowStats* draft_stats = nullptr;
};

struct ChainResult {
  int32_t accepted = 0;  // accepted draft tokens
  int32_t emitted = 0;   // accepted + 1 (the correction or bonus token)
};

// Writes accepted draft tokens then the correction or bonus token into out (capacity g + 1).
ChainResult verify_chain(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream, int32_t* out,
                         Fault fault = Fault::None);

// The fast path of verify_chain for temperature-only sampling (s.dense(), not greedy), in the
// blocked scheme of sampling.h: the same decisions from the same Philox draws, with z summed by
// blocks. Each row is read from memory once for its block statistics; exp terms are computed only
// for the rows the walk reaches (on these CPUs the exps, not the memory, bound the walk), and kept
// only for the pair under test, whose residual needs all of them.
// Every row is validated: its outcome goes to tcheck (g + 1 target rows) and dcheck (g draft
// rows). The result is meaningful only when all of them are Ok (else the caller throws).
// spread: one chain on an idle pool. One parallel region over every (row, block) reads and
//   validates every row and sums the first pair; each later position reached sums its pair (from
//   cache) in one more region, and a residual spreads its blocks.
// Otherwise one thread walks the positions in order (a batch spreads its sequences over the pool),
//   and reads the rows after the stopping point for validation only.
struct BlockedChainScratch {
  std::vector<BlockStat> stats;     // (2g + 1) x blocks: target rows 0..g, then draft rows
  std::vector<float> scale, mass;   // (2g + 1) x blocks
  std::vector<float> rmass;         // blocks
  std::vector<float> e;             // 2 x V: the exp terms of the target and draft row under test
  std::vector<size_t> order;        // rows in reading order
  std::vector<size_t> side;         // rows to prefetch while a pair's exps run
};
ChainResult verify_chain_blocked(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream,
                                 int32_t* out, BlockedChainScratch& w, RowCheck* tcheck, RowCheck* dcheck,
                                 bool spread);

enum class TreeChildren : int32_t { WithReplacement = 0, WithoutReplacement = 1, Deterministic = 2 };

struct TreeInput {
  const int32_t* parents = nullptr;  // n, -1 for children of the root, parents[i] < i
  const int32_t* tokens = nullptr;   // n
  int32_t n = 0;
  const float* target = nullptr;  // (n + 1) x V: row 0 at the root, row i + 1 after node i
  const float* draft = nullptr;   // (n + 1) x V, unused (may be null) when greedy or deterministic
  int32_t vocab = 0;
};

struct TreeResult {
  int32_t path_len = 0;  // accepted nodes, root to leaf
  int32_t emitted = 0;   // path_len + 1
};

// Checks parents and tokens (RangeError naming the argument and index).
void validate_tree(const TreeInput& in);

// Writes the accepted node indices to path (capacity n) and the emitted tokens to out (capacity n + 1).
TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed, uint64_t stream,
                       int32_t* path, int32_t* out, Fault fault = Fault::None);

}  // namespace osd
