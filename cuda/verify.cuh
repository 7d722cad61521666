// Chain and tree verification on the GPU: the device-pointer API (no host synchronisation; the
// host-pointer versions behind the Backend contract are in cuda_backend.cu).
//
// Chain (B sequences of ragged length, no host synchronisation): greedy and temperature-only
// sequences run on the blocked scheme (chain_blocked.cu: per-block statistics over the whole GPU,
// then per-sequence accept tests, residual masses and sampling); top-k / top-p and planted faults
// run the reference walk: each block validates and warps one logits row (persistent grid over
// rows), and the block that finishes a sequence's last row walks it. Tree: the reference walk, per
// request, with the SpecInfer walk.
// Decisions are the CPU's (spec/verify.cpp) for the same Philox draws; see warp.cuh for how.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "warp.cuh"
#include "workspace.cuh"

namespace osd {
namespace cuda {

struct ChainBatchDevice {
  const float* target = nullptr;    // device: sum_b (g_b + 1) rows x V
  const float* draft = nullptr;     // device: sum_b g_b rows x V (null when every sequence is greedy)
  const int32_t* tokens = nullptr;  // device: sum_b g_b
  const int32_t* lengths = nullptr;   // host: B
  const uint64_t* streams = nullptr;  // host: B
  const Sampling* sampling = nullptr;  // host: B
  int32_t batch = 0;
  int32_t vocab = 0;
  uint64_t seed = 0;
  int32_t* accepted = nullptr;    // device out: B (-1 when one of the sequence's rows is invalid)
  int32_t* out_tokens = nullptr;  // device out: sum_b (g_b + 1), sequence b at sum_{b'<b} (g_b' + 1)
};

// Enqueues the whole verification on `stream`. row_origins (optional) receives one entry per
// prepared row, in the order of the RowStat array ws.stats.
void chain_verify_launch(const ChainBatchDevice& in, Fault fault, Workspace& ws, cudaStream_t stream,
                         std::vector<RowOrigin>* row_origins = nullptr);

struct TreeRequestDevice {
  const int32_t* parents = nullptr;  // host: n
  const int32_t* tokens = nullptr;   // host: n
  int32_t n = 0;
  const float* target = nullptr;  // device: (n + 1) x V
  const float* draft = nullptr;   // device: (n + 1) x V, unused when greedy or deterministic
  int32_t vocab = 0;
  Sampling sampling;
  TreeChildren mode = TreeChildren::WithReplacement;
  uint64_t stream = 0;
  int32_t* out_tokens = nullptr;  // device out: n + 1
  int32_t* out_path = nullptr;    // device out: n
  int32_t* out_counts = nullptr;  // device out: 2 (path_len, emitted), -1 when a row is invalid
};

// Enqueues tree verification for every request in one launch (trees must pass validate_tree).
void tree_verify_launch(const TreeRequestDevice* reqs, int32_t count, uint64_t seed, Fault fault, Workspace& ws,
                        cudaStream_t stream, std::vector<RowOrigin>* row_origins = nullptr);

// Which kernels a tree launch runs. Auto: warp-prepared rows then the walks when the rows exceed one
// wave of row blocks and none is top-k / top-p, else one kernel of row blocks that also walk. Split
// forces the former wherever no row is top-k / top-p (tests use it to cover small launches).
enum class TreeLaunch { Auto, OneKernel, Split };
void set_tree_launch(TreeLaunch mode);
// Tree launches that took the split path since the process started (tests check which path ran).
long tree_split_launches();

// Profiling (a build with OSD_CUDA_PHASES): the phase timestamps of the last tree launch for the
// first row block and the first request's walk, in microseconds after that block started, and
// clears them. Empty in other builds. bench_cuda --phases prints them.
constexpr int kTreePhases = 20;
struct TreePhase {
  const char* name;
  double us;
};
std::vector<TreePhase> tree_phases();

}  // namespace cuda
}  // namespace osd
