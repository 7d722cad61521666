// Warping (temperature, top-k, top-p) on the GPU: the row types and the host API. The device code,
// shared by warp.cu (the warp_rows op) and verify.cu (chain and tree verification), is in
// warp_device.cuh.
//
// Everything here reproduces native/spec/sampling.cpp exactly:
//  - a dense (temperature-only) row keeps its exp terms e_j = exp_approx((l_j - max) * inv_t) and
//    z = sum_exp(): 16 float lanes over j < 16*floor(V/16), each summed in index order, a double tail,
//    then the lanes added in order. The GPU runs those 16 chains literally (one warp, fed through
//    shared memory by the other 15), because the CPU's probabilities depend on z's last bit.
//    Trees, warp_rows and chains under a planted fault use this (the CPU's reference walk);
//  - greedy and temperature-only chains without a planted fault, which the CPU verifies with
//    verify_chain_blocked, follow the blocked scheme of spec/sampling.h instead (chain_blocked.cu);
//  - a top-k / top-p row gets the same support and the same float probabilities as warp_row(). The
//    vocabulary is never sorted: a radix select finds the m best (logit desc, id asc), only those m
//    are sorted, and the prefix sums that decide the nucleus and its normaliser run in the CPU's order;
//    for top-p, m starts at 256 and grows x8 only while the nucleus is not reached;
//  - inverse-CDF sampling (sample_weights / sample_row) and normalise() use parallel sums with a
//    rigorous error bound: when the bound cannot prove that the CPU's sequential double sums give the
//    same answer, one thread recomputes them in the CPU's exact order (about 1e-10 of samples; up to
//    ~1e-3 of normalise() calls at V = 128256, where the float result of 1 / sum must be decided).
#pragma once
#include <string>
#include <vector>

#include "common.cuh"
#include "spec/sampling.h"
#include "workspace.cuh"

namespace osd {
namespace cuda {

enum RowMode : int32_t { kRowGreedy = 0, kRowDense = 1, kRowSparse = 2 };

// One row of logits to validate and warp.
struct RowTask {
  const float* logits;  // V logits (device)
  float* e_out;         // dense rows: the V exp terms are written here
  float* prob_out;      // sparse rows: the V warped probabilities (0 outside the support)
  // Sparse rows of the chain walk: the support as (id << 32 | probability bits), ascending ids, when
  // it holds at most kSupCap entries (RowStat::nsup says how many; -1: not written). Else nullptr.
  unsigned long long* sup;
  int32_t vocab;
  int32_t mode;  // RowMode
  float inv_t;   // 1.0f / temperature as the CPU computes it (1 for greedy)
  int32_t top_k;
  float top_p;
  int32_t owner;  // the sequence or request this row belongs to
};

// One kStatBlock-block of a row on the blocked scheme (chain_blocked.cu): the block's max bm_b, the
// first index of that max, whether it holds NaN or +Infinity, and (sampled rows) S_b.
struct UnitStat {
  float bm;
  float s;
  int32_t arg;
  int32_t bad;
};

// Result of a row. bad: 0 ok, 1 NaN or +Infinity, 2 all -Infinity.
struct RowStat {
  double z;      // dense and top-p-only rows: sum_exp; blocked-scheme rows: sum_b double(W_b) in block order
  float max;
  float inv_z;   // dense rows: float(1 / z)
  int32_t argmax;
  int32_t bad;
  int32_t nsup;  // entries of RowTask::sup written, or -1
};

constexpr int kSupCap = 4096;  // support entries a chain row keeps for the sampler (larger: dense scans)

// Global scratch for candidate sets larger than shared memory (slot_elems >= V each).
struct SlotPool {
  unsigned long long* base;
  long long slot_elems;
  int32_t* locks;
  int32_t n_slots;
};

// ---------------------------------------------------------------------------------------------
// Host side (warp.cu).

// Which logits row each prepared row is, so the host can name a bad row like the CPU does.
struct RowOrigin {
  int32_t owner;  // sequence / request
  int32_t draft;  // 0 target, 1 draft
  int32_t index;  // the CPU's row index in its error message
};

// The row mode the CPU reference uses for these settings and this vocabulary.
int32_t row_mode(const Sampling& s, int32_t vocab);
// A task for one row; e_out / prob_out are chosen by the caller from the mode.
RowTask make_row_task(const float* logits, int32_t vocab, const Sampling& s, int32_t owner);
// Slots for candidate sets too large for shared memory; no slots when no row is sparse.
SlotPool make_slot_pool(Workspace& ws, int32_t n_sparse_rows, int32_t vocab, int32_t grid, cudaStream_t stream);

// Reads back the RowStat.bad flags of the last launch (synchronises the stream) and returns the
// CPU's error message for the first bad row, or "" when every row is valid. The CPU checks chain
// batches targets first; trees request by request, row by row, the target row before the draft row
// (tree_order).
std::string first_row_error(Workspace& ws, const std::vector<RowOrigin>& origins, cudaStream_t stream,
                            bool tree_order, const char* target_name = "targetLogits",
                            const char* draft_name = "draftLogits");

// Warps rows (temperature, top-k, top-p) into dense probabilities, exactly WarpedRow::to_dense:
// out[r * V + j] (device pointers). Greedy settings (temperature 0) are a RangeError.
void warp_rows_launch(const float* logits, int32_t rows, int32_t vocab, const Sampling& s, float* out, Workspace& ws,
                      cudaStream_t stream, std::vector<RowOrigin>* row_origins = nullptr);

}  // namespace cuda
}  // namespace osd
