// Chain verification on the blocked scheme: greedy and temperature-only sequences without a
// planted fault, which the CPU verifies with verify_chain_blocked (sampled) or by argmax (greedy).
// Decisions are the CPU's, bit for bit, for the same Philox draws (spec/sampling.h, the blocked
// scheme). Parity: test/native/test_cuda.cu (chain_* tests), zero mismatches.
#pragma once
#include <vector>

#include "verify.cuh"

namespace osd {
namespace cuda {

// Enqueues the sequences `seqs` (indices into the batch; each greedy or temperature-only) of `in`,
// whose sequence b starts at target row trow[b] and draft row drow[b]. Their rows' RowStat go to
// stats[0 ..) in `origins` order (appended: one per row, target rows of a sequence first, then its
// draft rows), so that first_row_error can name a bad row.
void chain_blocked_launch(const ChainBatchDevice& in, const std::vector<int32_t>& seqs,
                          const std::vector<size_t>& trow, const std::vector<size_t>& drow, RowStat* stats,
                          Workspace& ws, cudaStream_t stream, std::vector<RowOrigin>& origins);

// The per-block kernels' shape (chain_blocked.cu): one CTA per (row, block) up to this many units
// per multiprocessor, else one warp per unit. Both give the same bits; tests force each (0: warps
// only, INT_MAX: CTAs only), and a negative value restores the default.
void set_split_units_per_sm(int units);

}  // namespace cuda
}  // namespace osd
